"""The random paged-attention batches (conformance/kernels.py) are what they claim to be."""

from __future__ import annotations

import torch
from hypothesis import given

from conformance.kernels import (  # noqa: F401  (re-exported for the other attention tests)
    BatchSpec,
    CaseLimits,
    DTYPES,
    PagedBatch,
    batch_specs,
    build_batch,
    check_backend_matches_reference,
    expected_outputs,
)
from ref.paged_reference import read_sequence


@given(batch_specs())
def test_block_tables_are_disjoint_and_cover_each_context(spec: BatchSpec) -> None:
    """Drawn tables use distinct blocks from the pool, exactly as many as each context needs."""
    used = [block for seq in spec.seqs for block in seq.blocks]
    assert len(used) == len(set(used))
    assert all(0 <= block < spec.num_blocks for block in used)
    for seq in spec.seqs:
        assert 1 <= seq.query_len <= seq.seq_len
        assert len(seq.blocks) == -(-seq.seq_len // spec.block_size)


@given(batch_specs(CaseLimits(max_seq_len=80, max_seqs=3)))
def test_cache_holds_each_sequence_contiguous_kv(spec: BatchSpec) -> None:
    """Reading a sequence back through its block table returns the K/V it was built from."""
    batch = build_batch(spec)
    for seq, k, v in zip(spec.seqs, batch.keys, batch.values):
        assert torch.equal(read_sequence(batch.k_cache, seq.blocks, seq.seq_len), k)
        assert torch.equal(read_sequence(batch.v_cache, seq.blocks, seq.seq_len), v)


def test_batch_paths_name_what_the_batch_asks_for() -> None:
    from conformance.kernels import batch_paths, fixed_spec

    paths = batch_paths(fixed_spec([(1, 32), (1, 17), (5, 40)], 16, group=6, head_dim=48, sliding_window=20))
    assert {"GQA group 6", "head_dim 48", "block_size 16", "fp32", "mixed batch: decodes beside prefills",
            "prefill chunk over cached context", "decodes of unequal context lengths",
            "context ends at a block boundary", "context ends one past a block boundary",
            "sliding window cuts a decode's context", "sliding window cuts a prefill's context"} <= paths
    assert "decode-only batch" not in paths and "fresh prefill" not in paths
    assert "decode-only batch" in batch_paths(fixed_spec([(1, 3)], 8))
    assert "fresh prefill" in batch_paths(fixed_spec([(3, 3)], 8))


def test_targeted_cases_reach_every_batch_path() -> None:
    from conformance.kernels import BATCH_PATHS, TARGETED_CASES, batch_paths

    reached = set().union(*(batch_paths(case.spec) for case in TARGETED_CASES if case.num_kv_splits is None))
    assert set(BATCH_PATHS) - reached == set()
