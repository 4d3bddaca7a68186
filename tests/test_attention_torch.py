"""The torch paged-attention backend against the dense reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conformance.compare import ATTENTION_TOL, assert_close
from fast.attention import AttentionMetadata, TorchAttentionBackend
from conformance.kernels import BatchSpec, batch_specs, build_batch, check_backend_matches_reference


@given(batch_specs())
def test_torch_backend_matches_dense_reference(spec: BatchSpec) -> None:
    """Mixed decode / prefill / chunk batches over random block tables equal the dense oracle."""
    check_backend_matches_reference(TorchAttentionBackend(), build_batch(spec))


@given(batch_specs(), st.data())
def test_torch_output_does_not_depend_on_batch_composition(spec: BatchSpec, data: st.DataObject) -> None:
    """A sequence attended alone gives its rows of the batched result, within tolerance."""
    batch = build_batch(spec)
    backend = TorchAttentionBackend()
    together = backend.forward(batch.q, batch.k_cache, batch.v_cache, batch.metadata, batch.scale, spec.sliding_window)
    i = data.draw(st.integers(0, len(spec.seqs) - 1), label="sequence")
    seq = spec.seqs[i]
    start = sum(s.query_len for s in spec.seqs[:i])
    alone_meta = AttentionMetadata.from_lists([seq.query_len], [seq.seq_len], [list(seq.blocks)], spec.block_size)
    alone = backend.forward(
        batch.q[start : start + seq.query_len], batch.k_cache, batch.v_cache, alone_meta, batch.scale, spec.sliding_window
    )
    atol, rtol = ATTENTION_TOL[spec.dtype]
    assert_close(f"sequence {i} alone vs in batch", alone, together[start : start + seq.query_len], atol, rtol)


def test_torch_forward_writes_into_out_and_leaves_padding_rows() -> None:
    """`out` is filled in place and returned; q rows past metadata.num_tokens are not written."""
    metadata = AttentionMetadata.from_lists([1, 3], [5, 3], [[2], [0]], block_size=8)
    k_cache = torch.randn(4, 8, 1, 32)
    v_cache = torch.randn(4, 8, 1, 32)
    q = torch.randn(6, 2, 32)  # 4 real rows + 2 padding
    out = torch.full_like(q, 7.0)
    result = TorchAttentionBackend().forward(q, k_cache, v_cache, metadata, 0.5, out=out)
    assert result is out
    assert torch.all(out[4:] == 7.0)
    assert not torch.any(out[:4] == 7.0)


@pytest.mark.parametrize(
    ("q_shape", "cache_shape", "match"),
    [
        ((2, 4, 32), (4, 8, 3, 32), "q: expected"),  # 4 heads not a multiple of 3 kv heads
        ((2, 4, 16), (4, 8, 2, 32), "q: expected"),  # head_dim differs
        ((2, 4, 32), (4, 16, 2, 32), "block_size"),  # metadata built for block size 8
        ((1, 4, 32), (4, 8, 2, 32), "metadata.num_tokens"),  # fewer q rows than query tokens
    ],
)
def test_torch_forward_rejects_mismatched_shapes(q_shape, cache_shape, match) -> None:
    metadata = AttentionMetadata.from_lists([2], [5], [[1]], block_size=8)
    with pytest.raises(ValueError, match=match):
        TorchAttentionBackend().forward(
            torch.randn(q_shape), torch.randn(cache_shape), torch.randn(cache_shape), metadata, 1.0
        )


def test_torch_forward_rejects_dtype_mismatch() -> None:
    metadata = AttentionMetadata.from_lists([1], [5], [[1]], block_size=8)
    cache = torch.randn(4, 8, 2, 32)
    with pytest.raises(ValueError, match="q:"):
        TorchAttentionBackend().forward(torch.randn(1, 2, 32, dtype=torch.float16), cache, cache.clone(), metadata, 1.0)
