"""Random paged-attention batches and the check of a backend against the dense oracle.

Shared by the kernel tier of the suite and by tests/test_attention_*.py.

A batch mixes decodes (query_len 1), fresh prefills (query_len == seq_len) and prefill chunks
over cached context, in random order, with lengths biased to block boundaries; each sequence's
blocks are drawn without replacement from a pool larger than needed, so block tables are
non-contiguous and unused blocks exist.

`KernelTier` runs the kernel tier: a fixed list of targeted cases (`targeted_cases`) on every
backend, then the random batches. Each batch is classified into the code paths it takes: the
batch's own shape (`batch_paths`: decode-only or mixed, chunk over cached context, window, GQA
group, dtype, ...) and, for a backend that exposes `launch_shape` (the Triton one), the kernel
paths its launch implies (`launch_paths`: decode row block, tiles per program, query blocks per
sequence, split-KV segments, ...), and for one that exposes `decode_plan` (the C++ "cpu" one) the
paths of its decode kernel (`cpu_paths`: row path, tiles across cache blocks, passes of query
heads, ...). `KernelCoverage` records the paths reached per backend and fails naming every
required path that no case reached.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import currently_in_test_context, note
from hypothesis import strategies as st

from conformance.compare import ATTENTION_TOL, assert_close
from conformance.coverage import RequiredCoverage
from fast.attention import AttentionBackend, AttentionMetadata
from ref.paged_reference import batch_attention, write_sequence

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_SIZES = (8, 16, 32)
GROUPS = (1, 2, 4, 6, 8)  # 6: not a power of two, so the Triton kernel masks padded head rows
HEAD_DIMS = (32, 48, 64, 128)  # 48: not a power of two, so the Triton kernel masks padded dims
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class CaseLimits:
    """How big the drawn batches may get (the Triton interpreter needs small ones)."""

    max_seq_len: int = 600
    max_seqs: int = 6
    max_kv_heads: int = 2
    head_dims: tuple[int, ...] = HEAD_DIMS
    kinds: tuple[str, ...] = ("decode", "prefill", "chunk")  # which sequence kinds to draw


@dataclass(frozen=True)
class SequenceSpec:
    query_len: int
    seq_len: int
    blocks: tuple[int, ...]  # the sequence's block table (exactly the blocks it needs)


@dataclass(frozen=True)
class BatchSpec:
    """Everything that defines one test batch; tensors are drawn from `seed`."""

    dtype: torch.dtype
    block_size: int
    num_kv_heads: int
    group: int
    head_dim: int
    num_blocks: int  # size of the block pool
    sliding_window: int | None
    q_gain: float  # scales q: larger values give peakier softmaxes
    seqs: tuple[SequenceSpec, ...]
    seed: int

    def describe(self) -> str:
        lens = ", ".join(f"{s.query_len}/{s.seq_len}" for s in self.seqs)
        return (
            f"{self.dtype} block_size={self.block_size} kv_heads={self.num_kv_heads} group={self.group} "
            f"head_dim={self.head_dim} pool={self.num_blocks} window={self.sliding_window} "
            f"q_gain={self.q_gain} query/seq lens=[{lens}]"
        )


@st.composite
def seq_lens(draw: st.DrawFn, block_size: int, max_seq_len: int) -> int:
    """A context length, half the time exactly at or next to a block boundary."""
    boundary = [
        n
        for k in range(1, max_seq_len // block_size + 1)
        for n in (k * block_size - 1, k * block_size, k * block_size + 1)
        if 1 <= n <= max_seq_len
    ]
    if boundary and draw(st.booleans()):
        return draw(st.sampled_from(boundary))
    return draw(st.integers(1, max_seq_len))


@st.composite
def query_len_for(draw: st.DrawFn, seq_len: int, kinds: tuple[str, ...]) -> int:
    """Decode, a fresh prefill, or a prefill chunk over cached context (one of `kinds`)."""
    kind = draw(st.sampled_from(kinds))
    if kind == "decode" or seq_len == 1:
        return 1
    if kind == "prefill":
        return seq_len
    return draw(st.integers(1, seq_len - 1))


@st.composite
def batch_specs(draw: st.DrawFn, limits: CaseLimits = CaseLimits(), dtypes: tuple[torch.dtype, ...] = DTYPES) -> BatchSpec:
    block_size = draw(st.sampled_from(BLOCK_SIZES))
    num_seqs = draw(st.integers(1, limits.max_seqs))
    lens = [draw(seq_lens(block_size, limits.max_seq_len)) for _ in range(num_seqs)]
    query_lens = [draw(query_len_for(seq_len, limits.kinds)) for seq_len in lens]
    needed = [-(-seq_len // block_size) for seq_len in lens]
    num_blocks = sum(needed) + draw(st.integers(0, 2 * sum(needed) + 8))
    seed = draw(st.integers(0, 2**31 - 1))
    pool = random.Random(seed).sample(range(num_blocks), sum(needed))
    seqs = []
    for query_len, seq_len, n in zip(query_lens, lens, needed):
        seqs.append(SequenceSpec(query_len, seq_len, tuple(pool[:n])))
        pool = pool[n:]
    return BatchSpec(
        dtype=draw(st.sampled_from(dtypes)),
        block_size=block_size,
        num_kv_heads=draw(st.integers(1, limits.max_kv_heads)),
        group=draw(st.sampled_from(GROUPS)),
        head_dim=draw(st.sampled_from(limits.head_dims)),
        num_blocks=num_blocks,
        sliding_window=draw(st.none() | st.integers(1, limits.max_seq_len)),
        q_gain=draw(st.sampled_from((1.0, 4.0))),
        seqs=tuple(seqs),
        seed=seed,
    )


@dataclass
class PagedBatch:
    """A batch's tensors: the paged cache with every sequence written, and the contiguous originals."""

    spec: BatchSpec
    q: torch.Tensor  # [num_tokens, Hq, D] on the test device
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    metadata: AttentionMetadata
    keys: list[torch.Tensor]  # per sequence [seq_len, Hkv, D], on CPU
    values: list[torch.Tensor]
    scale: float


def build_batch(spec: BatchSpec, device: str = "cpu", unused_fill: float | None = None) -> PagedBatch:
    """Draw the tensors of `spec` and write each sequence into the cache with the reference writer.

    Cache slots no sequence covers hold large finite garbage, or `unused_fill` (e.g. NaN, for a
    backend that promises never to read them).
    """
    gen = torch.Generator().manual_seed(spec.seed)
    hkv, d = spec.num_kv_heads, spec.head_dim
    cache_shape = (spec.num_blocks, spec.block_size, hkv, d)
    k_cache = (100 * torch.randn(cache_shape, generator=gen)).to(spec.dtype)
    v_cache = (100 * torch.randn(cache_shape, generator=gen)).to(spec.dtype)
    if unused_fill is not None:
        k_cache.fill_(unused_fill)
        v_cache.fill_(unused_fill)
    keys, values = [], []
    for seq in spec.seqs:
        keys.append(torch.randn((seq.seq_len, hkv, d), generator=gen).to(spec.dtype))
        values.append(torch.randn((seq.seq_len, hkv, d), generator=gen).to(spec.dtype))
        write_sequence(k_cache, seq.blocks, keys[-1])
        write_sequence(v_cache, seq.blocks, values[-1])
    num_tokens = sum(seq.query_len for seq in spec.seqs)
    q = (spec.q_gain * torch.randn((num_tokens, hkv * spec.group, d), generator=gen)).to(spec.dtype)
    metadata = AttentionMetadata.from_lists(
        [seq.query_len for seq in spec.seqs],
        [seq.seq_len for seq in spec.seqs],
        [list(seq.blocks) for seq in spec.seqs],
        spec.block_size,
        device,
    )
    return PagedBatch(
        spec, q.to(device), k_cache.to(device), v_cache.to(device), metadata, keys, values, d**-0.5
    )


def expected_outputs(batch: PagedBatch) -> list[torch.Tensor]:
    """The dense oracle per sequence, computed on CPU from the contiguous K/V."""
    return batch_attention(
        batch.q.cpu(),
        batch.keys,
        batch.values,
        [seq.query_len for seq in batch.spec.seqs],
        batch.scale,
        batch.spec.sliding_window,
    )


def check_backend_matches_reference(backend: AttentionBackend, batch: PagedBatch, label: str | None = None) -> None:
    """Run `backend` on the batch and compare each sequence with the oracle within ATTENTION_TOL.

    `label` names the backend in a failure message (default: its `name`)."""
    if currently_in_test_context():
        note(batch.spec.describe())
    batch.metadata.check_invariants()
    out = backend.forward(
        batch.q, batch.k_cache, batch.v_cache, batch.metadata, batch.scale, batch.spec.sliding_window
    )
    atol, rtol = ATTENTION_TOL[batch.spec.dtype]
    start = 0
    for i, (seq, expected) in enumerate(zip(batch.spec.seqs, expected_outputs(batch))):
        actual, expected = out[start : start + seq.query_len].cpu(), expected.cpu()
        name = f"{label or backend.name} sequence {i} (query_len={seq.query_len}, seq_len={seq.seq_len}) [query, head, dim]"
        # assert_close compares |diff| > bound, which is False for NaN: a NaN output (a read of a
        # NaN-filled unused slot, a head never computed) would pass it. Non-finite values first.
        bad = ~torch.isfinite(actual.float()) & torch.isfinite(expected.float())
        if bool(bad.any()):
            idx = tuple(int(j) for j in bad.nonzero()[0])
            raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} elements not finite; first at {idx}: "
                                 f"actual={actual[idx].item():.6g} expected={expected[idx].item():.6g}")
        assert_close(name, actual, expected, atol, rtol)
        start += seq.query_len


# ----------------------------------------------------------------------------- code paths


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Paths every backend must reach: what the batch itself asks for.
BATCH_PATHS: tuple[str, ...] = (
    *(f"GQA group {g}" for g in GROUPS),
    *(f"block_size {b}" for b in BLOCK_SIZES),
    *(f"head_dim {d}" for d in HEAD_DIMS),
    *DTYPE_NAMES.values(),
    "decode-only batch",
    "mixed batch: decodes beside prefills",
    "fresh prefill",
    "prefill chunk over cached context",
    "decodes of unequal context lengths",
    "context ends at a block boundary",
    "context ends one past a block boundary",
    "sliding window cuts a decode's context",
    "sliding window cuts a prefill's context",
)

# Paths of a Triton-style launch (a backend exposing `launch_shape`), derived from the launch
# it would choose; the split-KV ones are required of a backend that also has `with_kv_splits`.
LAUNCH_PATHS: tuple[str, ...] = (
    "BLOCK_M 16 (decode-only launch)",
    "BLOCK_M 64 (launch with prefills)",
    "padded GQA rows (group not a power of two)",
    "padded head_dim",
    "TILE spans several cache blocks",
    "TILE is one cache block",
    "several tiles in one program (online-softmax rescale)",
    "several query blocks per sequence",
    "query block past its sequence's queries (early exit)",
    "sliding window skips whole tiles",
)
SPLIT_KV_PATHS: tuple[str, ...] = (
    "split-KV",
    "split-KV on a launch with prefills",
    "split-KV under a sliding window",
    "split-KV: segment of several tiles",
    "split-KV: short last segment",
    "split-KV: empty segment",
)


# Paths of the C++ "cpu" decode kernel (a backend exposing `decode_plan`, `row_path` and
# `heads_per_pass`), reached by its decode sequences only (its prefill chunks run the torch path).
# Required of it: CPU_PATHS, the row path of each head_dim of HEAD_DIMS on this build ("rows in
# 512-bit vectors" with AVX-512, 256-bit with AVX2, "rows in portable loops" elsewhere), and on a
# vector build CPU_VECTOR_PATHS (the partial pass only where some head_dim's pass holds more than
# one head). Reported, not required: "work items of whole sequences" (>= 4 decodes per thread,
# out of the tier's reach on a machine with many threads; tests/test_attention_cpu.py forces it).
CPU_TILE = 16  # positions per tile of the vector path (the portable path goes block by block)
CPU_PATHS: tuple[str, ...] = (
    "tile within one cache block",
    "several tiles per decode (online-softmax rescale)",
    "partial last tile",
    "sliding window starts mid-block",
)
CPU_VECTOR_PATHS: tuple[str, ...] = (
    "tile across cache blocks (16-position tiles)",
    "GQA heads in full passes over each row",
    "GQA heads in a partial pass (the remainder)",
)


def cpu_row_path(row_bits: int) -> str:
    return f"rows in {row_bits}-bit vectors" if row_bits else "rows in portable loops"


def cpu_required_paths(backend: Any) -> tuple[str, ...]:
    """What the cpu backend's cases must reach on this build (see CPU_PATHS)."""
    rows = sorted({backend.row_path(d) for d in HEAD_DIMS}, reverse=True)
    required = CPU_PATHS + tuple(cpu_row_path(bits) for bits in rows)
    if any(rows):
        vector_dims = [d for d in HEAD_DIMS if backend.row_path(d)]
        partial = any(backend.heads_per_pass(d) > 1 for d in vector_dims)
        required += tuple(p for p in CPU_VECTOR_PATHS if partial or "partial pass" not in p)
    return required


def cpu_paths(spec: BatchSpec, plan: Any) -> set[str]:
    """The paths of the cpu kernel on `spec`'s decodes. `plan` has the fields of
    `fast.attention.cpu_backend.DecodePlan` (row_bits, heads_per_item, heads_per_pass). The walk
    mirrors the kernel: the visible positions [start, seq_len) in tiles of CPU_TILE from start
    (vector path; a tile may cross blocks), or the parts of each block in the window (portable)."""
    decodes = [s for s in spec.seqs if s.query_len == 1]
    if not decodes:
        return set()
    paths = {cpu_row_path(plan.row_bits)}
    if plan.heads_per_item > 1 and spec.num_kv_heads > 1:
        paths.add("work items of whole sequences")
    if plan.row_bits:
        if spec.group >= plan.heads_per_pass:
            paths.add("GQA heads in full passes over each row")
        if spec.group % plan.heads_per_pass:
            paths.add("GQA heads in a partial pass (the remainder)")
    bs = spec.block_size
    for s in decodes:
        start = 0 if spec.sliding_window is None else max(0, s.seq_len - spec.sliding_window)
        if start % bs:
            paths.add("sliding window starts mid-block")
        if plan.row_bits:
            tiles = [(t, min(t + CPU_TILE, s.seq_len)) for t in range(start, s.seq_len, CPU_TILE)]
        else:
            tiles = [(max(start, b * bs), min(s.seq_len, (b + 1) * bs))
                     for b in range(start // bs, _cdiv(s.seq_len, bs))]
        if len(tiles) > 1:
            paths.add("several tiles per decode (online-softmax rescale)")
        if tiles[-1][1] - tiles[-1][0] < (CPU_TILE if plan.row_bits else bs):
            paths.add("partial last tile")
        for lo, hi in tiles:
            crosses = lo // bs != (hi - 1) // bs
            paths.add("tile across cache blocks (16-position tiles)" if crosses else "tile within one cache block")
    return paths


def batch_paths(spec: BatchSpec) -> set[str]:
    """The paths a batch asks of any backend: its kinds of sequences, window cuts, shapes, dtype."""
    paths = {f"GQA group {spec.group}", f"block_size {spec.block_size}", f"head_dim {spec.head_dim}",
             DTYPE_NAMES[spec.dtype]}
    decodes = [s for s in spec.seqs if s.query_len == 1]
    prefills = [s for s in spec.seqs if s.query_len > 1]
    if not prefills:
        paths.add("decode-only batch")
    elif decodes:
        paths.add("mixed batch: decodes beside prefills")
    if any(s.query_len == s.seq_len for s in prefills):
        paths.add("fresh prefill")
    if any(s.query_len < s.seq_len for s in prefills):
        paths.add("prefill chunk over cached context")
    if len({s.seq_len for s in decodes}) > 1:
        paths.add("decodes of unequal context lengths")
    for s in spec.seqs:
        if s.seq_len % spec.block_size == 0:
            paths.add("context ends at a block boundary")
        elif s.seq_len > spec.block_size and s.seq_len % spec.block_size == 1:
            paths.add("context ends one past a block boundary")
        if spec.sliding_window is not None and s.seq_len > spec.sliding_window:
            paths.add(f"sliding window cuts a {'decode' if s.query_len == 1 else 'prefill'}'s context")
    return paths


def launch_paths(spec: BatchSpec, launch: Any) -> set[str]:
    """The kernel paths of a Triton-style launch of `spec`.

    `launch` has the fields of `fast.attention.triton_backend.AttentionLaunch` (block_q,
    heads_padded, group, head_dim_padded, tile, num_segments). The walk below mirrors the
    kernel's program grid: (sequence, query block of block_q queries, kv head x segment); a
    program covers the key tiles from its first query's window start to its last query, and
    segment s of S takes tiles [lo + s * per, min(lo + (s + 1) * per, hi)), per = ceil((hi - lo) / S).
    """
    block_q, tile, num_segments = launch.block_q, launch.tile, launch.num_segments
    max_query_len = max(s.query_len for s in spec.seqs)
    kind = "decode-only launch" if max_query_len == 1 else "launch with prefills"
    paths = {f"BLOCK_M {block_q * launch.heads_padded} ({kind})",
             "TILE is one cache block" if tile <= spec.block_size else "TILE spans several cache blocks"}
    if launch.heads_padded > launch.group:
        paths.add("padded GQA rows (group not a power of two)")
    if launch.head_dim_padded > spec.head_dim:
        paths.add("padded head_dim")
    if num_segments > 1:
        paths.add("split-KV")
        if max_query_len > 1:
            paths.add("split-KV on a launch with prefills")
        if spec.sliding_window is not None:
            paths.add("split-KV under a sliding window")
    for seq in spec.seqs:
        context = seq.seq_len - seq.query_len
        for q_block in range(_cdiv(max_query_len, block_q)):
            if q_block * block_q >= seq.query_len:
                paths.add("query block past its sequence's queries (early exit)")
                continue
            if q_block > 0:
                paths.add("several query blocks per sequence")
            first_pos = context + q_block * block_q
            kv_end = min(first_pos + block_q, seq.seq_len)
            kv_start = 0 if spec.sliding_window is None else max(first_pos - spec.sliding_window + 1, 0)
            lo, hi = kv_start // tile, _cdiv(kv_end, tile)
            if lo > 0:
                paths.add("sliding window skips whole tiles")
            per = _cdiv(hi - lo, num_segments)
            tiles = [max(0, min(lo + (s + 1) * per, hi) - (lo + s * per)) for s in range(num_segments)]
            if max(tiles) > 1:
                paths.add("several tiles in one program (online-softmax rescale)")
                if num_segments > 1:
                    paths.add("split-KV: segment of several tiles")
            if num_segments > 1 and 0 in tiles:
                paths.add("split-KV: empty segment")
            if num_segments > 1 and any(0 < n < per for n in tiles):
                paths.add("split-KV: short last segment")
    return paths


# ----------------------------------------------------------------------------- targeted cases


@dataclass(frozen=True)
class KernelCase:
    """A hand-picked batch that reaches named paths. With `num_kv_splits` it runs on the
    backend's `with_kv_splits(n)` twin, and is skipped for a backend without one."""

    name: str
    spec: BatchSpec
    num_kv_splits: int | None = None


def fixed_spec(lens: list[tuple[int, int]], block_size: int, **fields: Any) -> BatchSpec:
    """(query_len, seq_len) sequences over shuffled block tables in a pool with 2 spare blocks."""
    needed = [_cdiv(seq_len, block_size) for _, seq_len in lens]
    num_blocks = sum(needed) + 2
    pool = random.Random(sum(needed) * 31 + block_size).sample(range(num_blocks), sum(needed))
    seqs = []
    for (query_len, seq_len), n in zip(lens, needed):
        seqs.append(SequenceSpec(query_len, seq_len, tuple(pool[:n])))
        pool = pool[n:]
    defaults: dict[str, Any] = dict(dtype=torch.float32, num_kv_heads=1, group=1, head_dim=32, sliding_window=None,
                                    q_gain=1.0, seed=7)
    return BatchSpec(block_size=block_size, num_blocks=num_blocks, seqs=tuple(seqs), **{**defaults, **fields})


# Together these reach every path of BATCH_PATHS, LAUNCH_PATHS and SPLIT_KV_PATHS (the kernel
# tier asserts it), each with small batches: Triton's CPU interpreter runs them in ~0.1 s each.
TARGETED_CASES: tuple[KernelCase, ...] = (
    KernelCase("decode-only: unequal contexts ending on and one past block boundaries, GQA 1",
               fixed_spec([(1, 64), (1, 17), (1, 40)], 16, group=1)),
    KernelCase("decode-only: GQA 8 over 2 kv heads, fp16, 4 blocks per tile",
               fixed_spec([(1, 33), (1, 8)], 8, group=8, num_kv_heads=2, dtype=torch.float16)),
    KernelCase("decode-only: GQA 2 over 2 kv heads, bf16, head_dim 64, window skipping a tile",
               fixed_spec([(1, 70), (1, 6)], 32, group=2, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16,
                     sliding_window=20)),
    KernelCase("fresh prefill over two query blocks, GQA 4, fp16",
               fixed_spec([(20, 20)], 16, group=4, dtype=torch.float16)),
    KernelCase("mixed: chunk over cached context beside a decode and a prefill, GQA 8, bf16",
               fixed_spec([(10, 45), (1, 30), (3, 3)], 8, group=8, dtype=torch.bfloat16)),
    KernelCase("chunk and decode under a window skipping a tile, GQA 1",
               fixed_spec([(12, 80), (1, 16)], 32, group=1, sliding_window=10, q_gain=4.0)),
    KernelCase("padded GQA rows (group 6) and padded head_dim 48, mixed",
               fixed_spec([(5, 9), (1, 40)], 16, group=6, head_dim=48)),
    KernelCase("head_dim 128, GQA 4 over 2 kv heads, mixed, fp16",
               fixed_spec([(1, 20), (4, 4)], 8, group=4, num_kv_heads=2, head_dim=128, dtype=torch.float16)),
    KernelCase("split-KV x2: full, short last and several-tile segments",
               fixed_spec([(1, 120), (1, 40), (1, 80)], 16, group=1, q_gain=4.0), num_kv_splits=2),
    KernelCase("split-KV x4: empty segments, GQA 4 over 2 kv heads, fp16",
               fixed_spec([(1, 70), (1, 10)], 8, group=4, num_kv_heads=2, dtype=torch.float16), num_kv_splits=4),
    KernelCase("split-KV x2 on a launch with prefills and a chunk, bf16",
               fixed_spec([(5, 40), (1, 33), (17, 17)], 16, group=4, num_kv_heads=2, dtype=torch.bfloat16),
               num_kv_splits=2),
    KernelCase("split-KV x2 under a sliding window, GQA 2",
               fixed_spec([(1, 90), (1, 50)], 32, group=2, sliding_window=40), num_kv_splits=2),
)


# ----------------------------------------------------------------------------- the tier


class KernelCoverage(RequiredCoverage):
    """How often each backend's cases reached each path, against the paths it must reach."""

    NEVER = "kernel paths never reached"

    def summary(self) -> str:
        lines = []
        for backend, counts in sorted(self.reached.items()):
            required = self.required.get(backend, ())
            done = sum(1 for p in required if counts[p])
            lines.append(f"{backend}: {done}/{len(required)} required paths, {len(counts)} reached: "
                         + ", ".join(f"{p} x{n}" for p, n in sorted(counts.items())))
        return "\n".join(lines)


class KernelTier:
    """The kernel tier against named backends: the targeted cases, then random batches.

    Uses only the backends' public methods (`forward`, and if present `launch_shape` and
    `with_kv_splits`), so the backends may be proxies of objects in the engine's process.
    """

    def __init__(self, backends: dict[str, Any], limits: dict[str, CaseLimits]) -> None:
        self.backends = backends
        self.limits = limits  # random batches, per backend name
        self.coverage = KernelCoverage()
        self._twins: dict[tuple[str, int], Any] = {}
        self._has_launch = {name: hasattr(b, "launch_shape") for name, b in backends.items()}
        self._has_plan = {name: hasattr(b, "decode_plan") for name, b in backends.items()}
        self._splittable = {name: hasattr(b, "with_kv_splits") for name, b in backends.items()}
        for name, backend in backends.items():
            required = BATCH_PATHS
            if self._has_launch[name]:
                required += LAUNCH_PATHS + (SPLIT_KV_PATHS if self._splittable[name] else ())
            if self._has_plan[name]:
                required += cpu_required_paths(backend)
            self.coverage.required[name] = required

    def backend(self, name: str, num_kv_splits: int | None) -> Any:
        if num_kv_splits is None:
            return self.backends[name]
        key = (name, num_kv_splits)
        if key not in self._twins:
            self._twins[key] = self.backends[name].with_kv_splits(num_kv_splits)
        return self._twins[key]

    def paths(self, name: str, num_kv_splits: int | None, batch: PagedBatch) -> set[str]:
        spec = batch.spec
        paths = batch_paths(spec)
        if self._has_launch[name]:
            launch = self.backend(name, num_kv_splits).launch_shape(
                spec.num_kv_heads * spec.group, tuple(batch.k_cache.shape), batch.metadata)
            paths |= launch_paths(spec, launch)
        if self._has_plan[name]:
            plan = self.backends[name].decode_plan(spec.num_kv_heads * spec.group, tuple(batch.k_cache.shape),
                                                   batch.metadata)
            paths |= cpu_paths(spec, plan)
        return paths

    def run(self, name: str, spec: BatchSpec, num_kv_splits: int | None = None) -> set[str]:
        """Check one batch on a backend (or its split-KV twin) and record the paths it reached.
        The batch is built on the backend's device (Triton on CUDA reads CUDA tensors)."""
        batch = build_batch(spec, device=str(getattr(self.backends[name], "device", "cpu")))
        label = name if num_kv_splits is None else f"{name}(num_kv_splits={num_kv_splits})"
        paths = self.paths(name, num_kv_splits, batch)
        if currently_in_test_context():
            note(f"{label} reaches: {', '.join(sorted(paths))}")
        check_backend_matches_reference(self.backend(name, num_kv_splits), batch, label)
        self.coverage.record(name, paths)
        return paths

    def run_targeted(self, cases: tuple[KernelCase, ...] = TARGETED_CASES) -> None:
        """Each case on each backend, then the coverage minimum; raises naming the failed case."""
        for name in sorted(self.backends):
            for case in cases:
                if case.num_kv_splits is not None and not self._splittable[name]:
                    continue
                label = name if case.num_kv_splits is None else f"{name}(num_kv_splits={case.num_kv_splits})"
                try:
                    self.run(name, case.spec, case.num_kv_splits)
                except Exception as err:  # noqa: BLE001 - any failure is reported with the case's name
                    raise AssertionError(
                        f"kernel case {case.name!r} failed on {label}: {type(err).__name__}: {err}\n"
                        f"  batch: {case.spec.describe()}") from err
        self.coverage.check_minimum()

    def random_cases(self) -> st.SearchStrategy:
        """(backend name, batch, num_kv_splits): splits drawn only for a backend with a split twin."""
        def for_backend(name: str) -> st.SearchStrategy:
            splits = st.sampled_from((None, 2, 4)) if self._splittable[name] else st.just(None)
            return st.tuples(st.just(name), batch_specs(self.limits[name]), splits)

        return st.sampled_from(sorted(self.backends)).flatmap(for_backend)

    def check_random(self, ctx: Any, case: tuple[str, BatchSpec, int | None]) -> None:
        """The kernel tier's property body: one random batch on one backend."""
        self.run(*case)
