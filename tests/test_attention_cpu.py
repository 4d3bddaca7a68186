"""The C++ CPU paged-attention backend (fast/attention/cpu_backend.py) against the dense reference.

The kernel is built once per machine (cached on disk; under xdist both workers may build, each in
its own directory, and the last rename wins). Without a compiler the tests are skipped, and
"auto" still works (it falls back to torch). Every row path of the kernel runs here: the build of
this machine (512-bit rows on AVX-512), and variants built with -DPAGEDLM_NO_AVX512 (256-bit rows)
and -DPAGEDLM_PORTABLE_ONLY (no vector path).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given

from conformance.compare import ATTENTION_TOL, assert_close
from conformance.kernels import (
    TARGETED_CASES,
    BatchSpec,
    CaseLimits,
    batch_specs,
    build_batch,
    check_backend_matches_reference,
    fixed_spec,
)
import fast.attention.cpu_backend as cpu
from fast.attention import AttentionMetadata, TorchAttentionBackend, get_backend
from fast.attention.cpu_backend import CpuAttentionBackend, CpuKernelUnavailable

try:
    BACKEND: CpuAttentionBackend | None = CpuAttentionBackend()
except CpuKernelUnavailable as err:  # pragma: no cover - machines without a C++ toolchain
    BACKEND, UNAVAILABLE = None, str(err)

needs_kernel = pytest.mark.skipif(BACKEND is None, reason="C++ kernel not buildable here")


@needs_kernel
@pytest.mark.parametrize("case", [c for c in TARGETED_CASES if c.num_kv_splits is None], ids=lambda c: c.name)
def test_cpu_backend_targeted_cases(case) -> None:
    """The kernel tier's hand-picked batches (decode-only, mixed, windows, GQA 1..8, fp16/bf16)."""
    check_backend_matches_reference(BACKEND, build_batch(case.spec))


@needs_kernel
@given(batch_specs())
def test_cpu_backend_matches_dense_reference(spec: BatchSpec) -> None:
    """Mixed decode / prefill / chunk batches over random block tables equal the dense oracle."""
    check_backend_matches_reference(BACKEND, build_batch(spec))


@needs_kernel
@given(batch_specs(CaseLimits(kinds=("decode",), max_seqs=8)))
def test_cpu_decode_kernel_matches_dense_reference(spec: BatchSpec) -> None:
    """Decode-only batches: everything runs in the C++ kernel. Unused cache slots hold NaN, so a
    read outside a sequence's visible positions (the torch path reads and masks whole blocks) fails."""
    check_backend_matches_reference(BACKEND, build_batch(spec, unused_fill=float("nan")))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_decode_long_context_online_softmax(dtype: torch.dtype) -> None:
    """Many blocks per sequence, peaky scores (q_gain 4): the running max moves across blocks."""
    spec = fixed_spec([(1, 1000), (1, 517), (1, 33)], 16, group=4, num_kv_heads=2, head_dim=64, dtype=dtype,
                      q_gain=4.0)
    check_backend_matches_reference(BACKEND, build_batch(spec))
    windowed = fixed_spec([(1, 1000), (1, 300)], 32, group=2, head_dim=128, dtype=dtype, sliding_window=257)
    check_backend_matches_reference(BACKEND, build_batch(windowed))


@needs_kernel
def test_cpu_matches_torch_backend_on_strided_q_and_out() -> None:
    """q and out that are views with a token stride wider than Hq * D (as a fused QKV split gives)."""
    spec = fixed_spec([(1, 40), (3, 20), (1, 9)], 8, group=4, num_kv_heads=2, head_dim=32)
    batch = build_batch(spec)
    wide = torch.randn(batch.q.shape[0], 3 * batch.q.shape[1], batch.q.shape[2])
    q = wide[:, : batch.q.shape[1]]
    q.copy_(batch.q)
    out_wide = torch.full_like(wide, 7.0)
    out = out_wide[:, 1 : 1 + batch.q.shape[1]]
    BACKEND.forward(q, batch.k_cache, batch.v_cache, batch.metadata, batch.scale, out=out)
    expected = TorchAttentionBackend().forward(batch.q, batch.k_cache, batch.v_cache, batch.metadata, batch.scale)
    assert_close("cpu vs torch", out, expected, *ATTENTION_TOL[torch.float32])
    assert torch.all(out_wide[:, 0] == 7.0) and torch.all(out_wide[:, 1 + batch.q.shape[1] :] == 7.0)


@needs_kernel
def test_cpu_forward_writes_into_out_and_leaves_padding_rows() -> None:
    metadata = AttentionMetadata.from_lists([1, 3, 1], [5, 3, 9], [[2], [0], [3, 1]], block_size=8)
    k_cache, v_cache = torch.randn(4, 8, 1, 32), torch.randn(4, 8, 1, 32)
    q = torch.randn(7, 2, 32)  # 5 real rows + 2 padding
    out = torch.full_like(q, 7.0)
    assert BACKEND.forward(q, k_cache, v_cache, metadata, 0.5, out=out) is out
    assert torch.all(out[5:] == 7.0)
    assert not torch.any(out[:5] == 7.0)


@needs_kernel
def test_cpu_rejects_non_cpu_index_dtype() -> None:
    """The launcher checks what the kernel trusts: int64 decode indices."""
    from dataclasses import replace

    metadata = AttentionMetadata.from_lists([1], [5], [[1]], block_size=8)
    bad = replace(metadata, decode=replace(metadata.decode, seq_lens=metadata.decode.seq_lens.int()))
    cache = torch.randn(4, 8, 1, 32)
    with pytest.raises(ValueError, match="seq_lens"):
        BACKEND.forward(torch.randn(1, 1, 32), cache, cache.clone(), bad, 1.0)


@needs_kernel
def test_get_backend_cpu_by_name() -> None:
    assert isinstance(get_backend("cpu", "cpu"), CpuAttentionBackend)


@needs_kernel
def test_planted_off_by_one_is_caught() -> None:
    """A build that drops each sequence's newest position (last = min(seq_len - 1, ...)) must fail
    the reference check: the tests can see a kernel bug."""
    planted = CpuAttentionBackend(defines=("PAGEDLM_PLANTED_OFF_BY_ONE",))
    batch = build_batch(TARGETED_CASES[0].spec)
    with pytest.raises(AssertionError):
        check_backend_matches_reference(planted, batch, "cpu(planted)")
    check_backend_matches_reference(BACKEND, batch)  # the real build passes the same batch


# ----------------------------------------------------------------------------- every row path

VARIANTS = {"native": (), "256-bit rows": ("PAGEDLM_NO_AVX512",), "portable": ("PAGEDLM_PORTABLE_ONLY",)}

# Decode-only batches reaching the kernel's paths: tiles crossing blocks (block 8), several tiles
# per block (block 32), windows starting mid-block, partial and one-position tiles, GQA groups
# served in full passes and a remainder pass (7 = 4 + 3, 6 = 4 + 2 or 2 + 2 + 2), head_dim 20 (no
# vector path), and >= 8 sequences (work items of whole sequences at <= 2 threads).
PATH_SPECS = [
    fixed_spec([(1, 1), (1, 17), (1, 100)], 8, group=7, num_kv_heads=2, head_dim=64, q_gain=4.0),
    fixed_spec([(1, 33), (1, 64), (1, 5)], 32, group=6, num_kv_heads=2, head_dim=128, sliding_window=21),
    fixed_spec([(1, n) for n in (1, 16, 17, 31, 48, 49, 70, 3, 90)], 16, group=4, num_kv_heads=2, head_dim=64,
               sliding_window=37),
    fixed_spec([(1, 40), (1, 9)], 16, group=3, num_kv_heads=1, head_dim=20),
    fixed_spec([(1, 40), (1, 29)], 16, group=2, num_kv_heads=2, head_dim=48, dtype=torch.float16),
    fixed_spec([(1, n) for n in range(20, 29)], 8, group=8, num_kv_heads=2, head_dim=32, dtype=torch.bfloat16,
               sliding_window=11),
]


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def variant(request) -> CpuAttentionBackend:
    if BACKEND is None:
        pytest.skip("C++ kernel not buildable here")
    return CpuAttentionBackend(defines=VARIANTS[request.param])


@pytest.mark.parametrize("spec", PATH_SPECS, ids=lambda s: s.describe()[:60])
@pytest.mark.parametrize("heads_per_item", ["one kv head", "whole sequence"])
def test_every_row_path_matches_dense_reference(variant, spec, heads_per_item, monkeypatch) -> None:
    """Each build variant, with both work-item shapes, against the oracle (NaN in unused slots)."""
    if heads_per_item == "whole sequence":
        monkeypatch.setattr(cpu, "heads_per_item", lambda num_seqs, num_kv_heads, threads: num_kv_heads)
    else:
        monkeypatch.setattr(cpu, "heads_per_item", lambda num_seqs, num_kv_heads, threads: 1)
    check_backend_matches_reference(variant, build_batch(spec, unused_fill=float("nan")))


@needs_kernel
def test_row_paths_and_plan() -> None:
    """head_dim 20 has no vector path anywhere; the variants take the paths their names say."""
    assert BACKEND.row_path(20) == 0
    assert CpuAttentionBackend(defines=VARIANTS["portable"]).row_path(64) == 0
    assert CpuAttentionBackend(defines=VARIANTS["256-bit rows"]).row_path(64) in (0, 256)
    assert BACKEND.row_path(64) in (0, 256, 512)
    spec = fixed_spec([(1, 9)] * 8 + [(3, 3)], 16, group=4, num_kv_heads=2, head_dim=64)
    batch = build_batch(spec)
    plan = BACKEND.decode_plan(8, tuple(batch.k_cache.shape), batch.metadata)
    assert plan.heads_per_item == cpu.heads_per_item(8, 2, torch.get_num_threads())
    assert plan.row_bits == BACKEND.row_path(64) and plan.heads_per_pass >= 1


# ----------------------------------------------------------------------------- the kernel tier's paths


@needs_kernel
def test_kernel_tier_targeted_cases_reach_every_cpu_path() -> None:
    """The conformance kernel tier runs this backend against the dense oracle, and its targeted
    cases alone reach every path it requires of it (else run_targeted fails naming them)."""
    from conformance.kernels import CaseLimits, KernelTier, cpu_required_paths

    tier = KernelTier({"cpu": BACKEND}, {"cpu": CaseLimits()})
    tier.run_targeted()
    assert set(cpu_required_paths(BACKEND)) <= set(tier.coverage.required["cpu"])


@needs_kernel
@pytest.mark.parametrize(("plant", "path"), [
    ("PAGEDLM_PLANTED_OFF_BY_ONE", "every decode"),
    ("PAGEDLM_PLANTED_TILE_IN_ONE_BLOCK", "tile across cache blocks (16-position tiles)"),
    ("PAGEDLM_PLANTED_NO_REMAINDER_PASS", "GQA heads in a partial pass (the remainder)"),
])
def test_kernel_tier_catches_planted_cpu_kernel_bugs(plant: str, path: str) -> None:
    """A build with a bug on one kernel path fails the tier's targeted cases, naming the case."""
    from conformance.kernels import CaseLimits, KernelTier

    planted = CpuAttentionBackend(defines=(plant,))
    if path != "every decode" and not any(planted.row_path(d) for d in (32, 48, 64, 128)):
        pytest.skip(f"no vector path on this machine: {path!r} is not a path here")
    tier = KernelTier({"cpu": planted}, {"cpu": CaseLimits()})
    with pytest.raises(AssertionError, match=r"kernel case '.*' failed on cpu"):
        tier.run_targeted()


def test_reference_check_fails_on_nan_outputs() -> None:
    """A NaN output fails the check (|NaN - x| > bound is False: assert_close alone passes it)."""

    class NanBackend(TorchAttentionBackend):
        name = "nan"

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out[0, 0, 0] = float("nan")
            return out

    with pytest.raises(AssertionError, match="not finite"):
        check_backend_matches_reference(NanBackend(), build_batch(TARGETED_CASES[0].spec))


def test_cpu_paths_follow_the_kernel_walk() -> None:
    from conformance.kernels import cpu_paths

    vector = cpu.DecodePlan(row_bits=512, heads_per_item=1, heads_per_pass=4)
    assert cpu_paths(fixed_spec([(1, 40)], 8, group=6), vector) == {  # tiles 0-15, 16-31 cross; 32-39 does not
        "rows in 512-bit vectors", "tile across cache blocks (16-position tiles)", "tile within one cache block",
        "several tiles per decode (online-softmax rescale)", "partial last tile",
        "GQA heads in full passes over each row", "GQA heads in a partial pass (the remainder)"}
    assert cpu_paths(fixed_spec([(1, 32)], 16, group=4), vector) == {
        "rows in 512-bit vectors", "tile within one cache block",
        "several tiles per decode (online-softmax rescale)", "GQA heads in full passes over each row"}
    windowed = cpu_paths(fixed_spec([(1, 50)], 32, group=1, sliding_window=20), vector)  # positions 30..49
    assert {"sliding window starts mid-block", "tile across cache blocks (16-position tiles)",
            "partial last tile", "GQA heads in a partial pass (the remainder)"} <= windowed
    assert "GQA heads in full passes over each row" not in windowed
    portable = cpu.DecodePlan(row_bits=0, heads_per_item=1, heads_per_pass=1)  # block by block
    assert cpu_paths(fixed_spec([(1, 40)], 8, group=6), portable) == {
        "rows in portable loops", "tile within one cache block", "several tiles per decode (online-softmax rescale)"}
    whole = cpu.DecodePlan(row_bits=256, heads_per_item=2, heads_per_pass=1)
    assert "work items of whole sequences" in cpu_paths(fixed_spec([(1, 5)], 8, num_kv_heads=2), whole)
    assert cpu_paths(fixed_spec([(5, 40)], 8), vector) == set()  # a prefill chunk runs the torch path


# ----------------------------------------------------------------------------- "auto" and the build


@needs_kernel
def test_auto_on_cpu_picks_the_cpu_kernel() -> None:
    assert isinstance(get_backend("auto", "cpu"), CpuAttentionBackend)


def test_build_failure_raises_clear_error_and_auto_falls_back(monkeypatch) -> None:
    """No compiler: constructing the backend names the cause; "auto" warns and returns the torch
    backend, which then runs."""
    import fast.attention as attention

    monkeypatch.setattr(cpu, "_libraries", {})  # forget this process's build
    monkeypatch.setattr(cpu, "CFLAGS", (*cpu.CFLAGS, "-DPAGEDLM_TEST_NO_COMPILER"))  # a name not on disk
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(CpuKernelUnavailable, match="could not build"):
        CpuAttentionBackend()
    assert attention.AUTO_CPU == "cpu"
    with pytest.warns(RuntimeWarning, match="uses the torch backend"):
        backend = get_backend("auto", "cpu")
    assert type(backend) is TorchAttentionBackend
    check_backend_matches_reference(backend, build_batch(TARGETED_CASES[0].spec))


BUILD_SCRIPT = textwrap.dedent("""
    import sys
    from fast.attention.cpu_backend import load_kernel
    load_kernel(tuple(sys.argv[1:]))
""")


def build_in_subprocess(extensions_dir: Path, define: str, timeout: float = 240) -> subprocess.Popen:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions_dir)}
    return subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, define], env=env, cwd=Path(cpu.__file__).parents[2],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@needs_kernel
def test_build_ignores_a_stale_lock_and_removes_killed_builds(tmp_path) -> None:
    """A build killed mid-way leaves torch's lock file in the extension's directory (with torch's
    own build every later build then waits on it forever) and its build directory: the next
    build neither waits nor keeps the old directory."""
    define = f"PAGEDLM_TEST_STALE_LOCK_{os.getpid()}"
    name = cpu.extension_name((define,))
    final_dir = tmp_path / name
    final_dir.mkdir()
    (final_dir / "lock").touch()  # what torch's FileBaton leaves behind
    killed = tmp_path / f"{name}.build-killed"
    killed.mkdir()
    (killed / "lock").touch()
    old = time.time() - 2 * cpu.STALE_BUILD_S
    os.utime(killed, (old, old))
    fresh = tmp_path / f"{name}.build-running"  # a build in progress elsewhere: kept
    fresh.mkdir()
    proc = build_in_subprocess(tmp_path, define)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert (final_dir / f"{name}.so").is_file()
    assert not killed.exists() and fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, fresh.name])


@needs_kernel
def test_concurrent_builds_both_succeed(tmp_path) -> None:
    """Two processes building the same new kernel at once: both load it, one library is left, and
    no build directory."""
    define = f"PAGEDLM_TEST_CONCURRENT_{os.getpid()}"
    name = cpu.extension_name((define,))
    procs = [build_in_subprocess(tmp_path, define) for _ in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert [p.name for p in (tmp_path / name).iterdir()] == [f"{name}.so"]
