"""Random paged-attention batches and the check of a backend against the dense oracle.

Shared by the kernel tier of the suite and by tests/test_attention_*.py.

A batch mixes decodes (query_len 1), fresh prefills (query_len == seq_len) and prefill chunks
over cached context, in random order, with lengths biased to block boundaries; each sequence's
blocks are drawn without replacement from a pool larger than needed, so block tables are
non-contiguous and unused blocks exist.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from hypothesis import currently_in_test_context, note
from hypothesis import strategies as st

from conformance.compare import ATTENTION_TOL, assert_close
from fast.attention import AttentionBackend, AttentionMetadata
from ref.paged_reference import batch_attention, write_sequence

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_SIZES = (8, 16, 32)
GROUPS = (1, 2, 4, 8)
HEAD_DIMS = (32, 64, 128)


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


def check_backend_matches_reference(backend: AttentionBackend, batch: PagedBatch) -> None:
    """Run `backend` on the batch and compare each sequence with the oracle within ATTENTION_TOL."""
    if currently_in_test_context():
        note(batch.spec.describe())
    batch.metadata.check_invariants()
    out = backend.forward(
        batch.q, batch.k_cache, batch.v_cache, batch.metadata, batch.scale, batch.spec.sliding_window
    )
    atol, rtol = ATTENTION_TOL[batch.spec.dtype]
    start = 0
    for i, (seq, expected) in enumerate(zip(batch.spec.seqs, expected_outputs(batch))):
        actual = out[start : start + seq.query_len].cpu()
        name = f"{backend.name} sequence {i} (query_len={seq.query_len}, seq_len={seq.seq_len}) [query, head, dim]"
        assert_close(name, actual, expected, atol, rtol)
        start += seq.query_len
