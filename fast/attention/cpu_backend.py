"""Paged decode attention in a small C++ kernel for CPU: K/V read in place, no gather pass.

The kernel (`csrc/paged_decode.cpp`) handles the decode sequences of a step (one query token
each): OpenMP work items of a sequence (with all its kv heads when there are enough sequences,
else one kv head each) walk the visible positions in tiles of 16 through the block table, straight
from the paged cache, with an online softmax in fp32. On x86 with AVX2/AVX-512 each loaded K row
serves all the query heads of its GQA group and the scores of a tile are reduced once per tile; the
next tiles' rows are prefetched into L2 (see the source). fp32, fp16 and bf16 caches; sliding
windows. Prefill chunks (query_len > 1, a few per step) run on the torch backend's path (gather +
SDPA; the gather is < 1 % of a 512-token chunk's time there), which this backend inherits,
together with `store_kv`.

Build: `torch.utils.cpp_extension.load` compiles the source once per machine with -O3
-march=native -fopenmp. The extension's name carries a hash of the source, the flags, torch's
version and this CPU's model and feature flags, so a -march=native binary is never loaded on
another CPU that shares the cache (a home directory on NFS). The library lives in torch's
per-user extensions cache (~/.cache/torch_extensions/<py>_cpu/<name>/<name>.so, or under
$TORCH_EXTENSIONS_DIR) and is loaded from there directly when present. A build runs in a fresh
directory of its own next to it and renames the library into place (atomic on one filesystem):
no build shares a directory, so there is no lock to wait on — torch's own lock file, left behind
by a build that was killed, made every later build wait forever — and a reader never sees half a
library; concurrent builds each compile and the last rename wins (identical files). Build
directories of builds killed more than an hour ago are removed. The source includes no torch
header (a plain C ABI called through ctypes), so a build takes seconds. A failed build (no
compiler, no ninja) raises `CpuKernelUnavailable`, naming the cause; `get_backend("auto")` then
warns and uses the torch backend.

The launcher below checks every argument the kernel trusts (dtypes, devices, contiguity, index
dtypes) before handing raw pointers over.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fast.attention.backend import check_forward_args
from fast.attention.metadata import AttentionMetadata, DecodeBatch
from fast.attention.torch_backend import TorchAttentionBackend, _LayerInputs

SOURCE = Path(__file__).with_name("csrc") / "paged_decode.cpp"
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17")
LDFLAGS = ("-fopenmp",)  # resolves to torch's libgomp.so.1 (same soname, already loaded): one thread pool
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
STALE_BUILD_S = 3600  # a build directory this old belongs to a build that was killed


class CpuKernelUnavailable(RuntimeError):
    """The C++ kernel could not be built or loaded on this machine."""


def _cpu_signature() -> str:
    """This CPU's model and feature flags: a -march=native build is valid only where they match."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def extension_name(defines: tuple[str, ...] = ()) -> str:
    """The extension's cache name: a hash of everything that changes the binary."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), repr((CFLAGS, LDFLAGS, defines)).encode(), torch.__version__.encode(),
                 _cpu_signature().encode()):
        digest.update(part)
    return f"pagedlm_cpu_attention_{digest.hexdigest()[:16]}"


_libraries: dict[tuple[str, ...], ctypes.CDLL | CpuKernelUnavailable] = {}
_build_lock = threading.Lock()


def load_kernel(defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The compiled kernel library (built on first use in this process; cached on disk).

    `defines` adds -D macros (tests build the planted-bug variant with one). Raises
    CpuKernelUnavailable, remembered for the process, when the build fails."""
    with _build_lock:
        lib = _libraries.get(defines)
        if lib is None:
            lib = _libraries[defines] = _build(defines)
    if isinstance(lib, CpuKernelUnavailable):
        raise lib
    return lib


def _build(defines: tuple[str, ...]) -> ctypes.CDLL | CpuKernelUnavailable:
    try:
        from torch.utils import cpp_extension

        name = extension_name(defines)
        library = Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"
        if not library.exists():
            _compile(cpp_extension, name, defines, library)
        lib = ctypes.CDLL(str(library))
    except Exception as err:  # noqa: BLE001 - any build or load failure means "use the torch backend"
        return CpuKernelUnavailable(
            f"the cpu attention backend could not build its C++ kernel ({SOURCE.name}): "
            f"{type(err).__name__}: {err}. It needs a C++17 compiler with OpenMP and ninja; "
            "use attention_backend='torch' instead."
        )
    fn = lib.pagedlm_decode_attention
    fn.restype = ctypes.c_int
    fn.argtypes = (
        [ctypes.c_int] + [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 10 + [ctypes.c_float, ctypes.c_int64]
        + [ctypes.c_int, ctypes.c_int64]
    )
    for query in (lib.pagedlm_row_path, lib.pagedlm_heads_per_pass):
        query.restype, query.argtypes = ctypes.c_int, [ctypes.c_int64]
    return lib


def _compile(cpp_extension, name: str, defines: tuple[str, ...], library: Path) -> None:
    """Build in a fresh directory of this process, then rename the library to `library`."""
    root = library.parent.parent
    _remove_stale_builds(root, name)
    build_dir = Path(tempfile.mkdtemp(prefix=f"{name}.build-", dir=root))
    try:
        cpp_extension.load(
            name,
            [str(SOURCE)],
            extra_cflags=[*CFLAGS, *(f"-D{d}" for d in defines)],
            extra_ldflags=list(LDFLAGS),
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
        os.replace(build_dir / f"{name}.so", library)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)


def _remove_stale_builds(root: Path, name: str) -> None:
    """Remove this extension's build directories older than STALE_BUILD_S (killed builds)."""
    cutoff = time.time() - STALE_BUILD_S
    for path in root.glob(f"{name}.build-*"):
        try:
            if path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:  # another process removed it first
            pass


@dataclass(frozen=True)
class DecodePlan:
    """How the kernel runs a decode batch: which row path, how it splits the work."""

    row_bits: int  # 512 / 256: vectors of that many bits per K/V row chunk; 0: the portable loops
    heads_per_item: int  # kv heads per work item: all of a sequence's, or 1
    heads_per_pass: int  # query heads of one kv head served by each loaded row (vector path)


def heads_per_item(num_seqs: int, num_kv_heads: int, num_threads: int) -> int:
    """A work item takes all kv heads of its sequence (each cache block is then read as one
    contiguous stretch) when there are >= 4 sequences per thread; else one kv head."""
    return num_kv_heads if num_seqs >= 4 * num_threads else 1


def paged_decode_attention(
    lib: ctypes.CDLL,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    decode: DecodeBatch,
    scale: float,
    sliding_window: int | None,
) -> None:
    """Write the decode rows of `out`: rows decode.query_rows of q attend their paged context.

    Expects the shapes `check_forward_args` has checked (q, out: [T, Hq, D] with unit last stride;
    caches contiguous [N, block_size, Hkv, D]; all on CPU, one dtype)."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    for name, t in (("query_rows", decode.query_rows), ("seq_lens", decode.seq_lens),
                    ("block_tables", decode.block_tables)):
        if t.dtype != torch.int64 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"decode.{name}: expected contiguous int64 on cpu, got {t.dtype} on {t.device}")
    for name, t in (("q", q), ("k_cache", k_cache), ("out", out)):
        if t.device.type != "cpu":
            raise ValueError(f"{name}: the cpu attention backend runs on CPU tensors, got {t.device}")
    batch, table_width = decode.block_tables.shape
    threads = torch.get_num_threads()
    rc = lib.pagedlm_decode_attention(
        DTYPE_CODES[q.dtype], q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
        decode.query_rows.data_ptr(), decode.seq_lens.data_ptr(), decode.block_tables.data_ptr(),
        table_width, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        batch, num_kv_heads, q.shape[1] // num_kv_heads, head_dim, block_size,
        scale, sliding_window or 0, threads, heads_per_item(batch, num_kv_heads, threads),
    )
    if rc != 0:
        raise RuntimeError(f"pagedlm_decode_attention returned {rc}")


class CpuAttentionBackend(TorchAttentionBackend):
    """Decode rows in the C++ paged kernel (no gather); prefill chunks and `store_kv` as the
    torch backend does them. Builds (or loads) the kernel when constructed; raises
    CpuKernelUnavailable if it cannot. `defines`: extra -D macros for the build (tests only)."""

    name = "cpu"

    def __init__(self, defines: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.lib = load_kernel(defines)

    def row_path(self, head_dim: int) -> int:
        """The row path this build takes for `head_dim`: 512 or 256 (vector bits), 0 (portable)."""
        return self.lib.pagedlm_row_path(head_dim)

    def heads_per_pass(self, head_dim: int) -> int:
        """The query heads of one kv head each loaded row serves at once, for `head_dim`."""
        return self.lib.pagedlm_heads_per_pass(head_dim)

    def decode_plan(self, num_heads: int, cache_shape: tuple[int, ...], metadata: AttentionMetadata) -> DecodePlan:
        """How `forward` would run the decode rows of `metadata` (for the kernel tier's coverage)."""
        _, _, num_kv_heads, head_dim = cache_shape
        return DecodePlan(
            row_bits=self.row_path(head_dim),
            heads_per_item=heads_per_item(metadata.decode.num_seqs, num_kv_heads, torch.get_num_threads()),
            heads_per_pass=self.heads_per_pass(head_dim),
        )

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_forward_args(q, k_cache, v_cache, metadata, sliding_window, out)
        if out is None:
            out = torch.empty_like(q)
        if metadata.decode.num_seqs > 0:
            if torch.autograd._profiler_enabled():  # a ctypes call is no aten op: name it for the profiler
                with torch.profiler.record_function("pagedlm::paged_decode_attention"):
                    paged_decode_attention(self.lib, q, k_cache, v_cache, out, metadata.decode, scale, sliding_window)
            else:
                paged_decode_attention(self.lib, q, k_cache, v_cache, out, metadata.decode, scale, sliding_window)
        if metadata.chunks:
            inputs = _LayerInputs(q, k_cache, v_cache, scale, sliding_window)
            for chunk in metadata.chunks:
                block_table = metadata.block_tables[chunk.seq_index]
                out[chunk.query_start : chunk.query_end] = self._chunk(inputs, block_table, chunk)
        return out
