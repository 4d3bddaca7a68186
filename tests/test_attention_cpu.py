"""The C++ CPU paged-attention backend (fast/attention/cpu_backend.py) against the dense reference.

The kernel is built once per test session (cached on disk by torch; under xdist the second worker
waits on torch's build lock). Without a compiler the tests are skipped, and "auto" still works.
"""

from __future__ import annotations

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


@needs_kernel
def test_auto_on_cpu_picks_the_cpu_kernel_when_enabled(monkeypatch) -> None:
    import fast.attention as attention

    monkeypatch.setattr(attention, "AUTO_CPU", "cpu")
    assert isinstance(get_backend("auto", "cpu"), CpuAttentionBackend)


def test_build_failure_raises_clear_error_and_auto_falls_back(monkeypatch) -> None:
    """No compiler: constructing the backend names the cause; "auto" (set to prefer the cpu
    kernel) warns and returns the torch backend."""
    import fast.attention as attention
    import fast.attention.cpu_backend as cpu

    monkeypatch.setattr(cpu, "_libraries", {})  # forget this process's build
    monkeypatch.setattr(cpu, "CFLAGS", (*cpu.CFLAGS, "-DPAGEDLM_TEST_NO_COMPILER"))  # a name not on disk
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(CpuKernelUnavailable, match="could not build"):
        CpuAttentionBackend()
    monkeypatch.setattr(attention, "AUTO_CPU", "cpu")
    with pytest.warns(RuntimeWarning, match="uses the torch backend"):
        assert isinstance(get_backend("auto", "cpu"), TorchAttentionBackend)
