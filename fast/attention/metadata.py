"""Per-step attention metadata: which query rows belong to which sequence, where its K/V lie.

A step's batch is flattened token-major. Sequence i owns query rows
`cu_seqlens_q[i] : cu_seqlens_q[i + 1]` of `q`; they are the LAST `query_len_i` tokens of its
context of `seq_len_i` tokens, whose K/V (the new tokens' included) are already in the cache:

    sequence i:   |<--------------------- seq_len_i --------------------->|
                  |<---- cached context ---->|<------ query_len_i ------->|
    position:     0                          c_i                  seq_len_i - 1
                                             (c_i = seq_len_i - query_len_i)

    query row cu_seqlens_q[i] + j sits at position p = c_i + j and sees the keys at positions
    max(0, p - sliding_window + 1) ... p          (0 ... p without a window)

The token at position p of sequence i lives in the cache at
    block  = block_tables[i, p // block_size],  offset = p % block_size
    (slot  = block * block_size + offset, the index `store_kv`'s slot_mapping uses).

Build one `AttentionMetadata` per step with `AttentionMetadata.from_lists`, and pass it to every
layer: the index tensors the torch backend needs are computed there, once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """One sequence with more than one query token (a prefill chunk, possibly over cached context)."""

    seq_index: int
    query_start: int  # first row of q
    query_end: int  # one past the last row of q
    seq_len: int  # context length including the new tokens

    @property
    def query_len(self) -> int:
        return self.query_end - self.query_start


@dataclass(frozen=True)
class DecodeBatch:
    """The step's decode sequences (one query token each), batched for the torch backend.

    Block tables are cut to the longest decode context: every decode sequence gathers that many
    blocks (the entries past its own context are padding, read and then masked out).
    """

    query_rows: torch.Tensor  # int64 [num_decodes]: the row of q holding each decode query
    seq_lens: torch.Tensor  # int64 [num_decodes]
    block_tables: torch.Tensor  # int64 [num_decodes, num_blocks]
    key_mask: torch.Tensor  # bool [num_decodes, 1, 1, num_blocks * block_size]: position < seq_len
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return self.query_rows.shape[0]


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each sequence's queries and K/V are, for one step; shared by all layers.

    Invariants (shapes and dtypes checked in `__post_init__`, values in `from_lists`; all of
    them by `check_invariants()`, which reads the tensors back and so syncs a GPU):
    - cu_seqlens_q is int32 [num_seqs + 1], starts at 0, non-decreasing by at least 1 per sequence;
      num_tokens == cu_seqlens_q[-1].
    - seq_lens is int32 [num_seqs], 1 <= query_len_i <= seq_len_i <= max_seq_len.
    - block_tables is int32 [num_seqs, max_blocks]; row i's first ceil(seq_len_i / block_size)
      entries are the sequence's blocks, the rest is padding (0, a valid block id: the torch
      backend may gather it and mask the result; the Triton kernels never read it).
    - decode + chunks partition the sequences: decode holds those with query_len == 1.
    """

    cu_seqlens_q: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    block_size: int
    max_query_len: int
    max_seq_len: int
    num_tokens: int  # == cu_seqlens_q[-1], the number of query rows in use
    decode: DecodeBatch
    chunks: tuple[PrefillChunk, ...]

    def __post_init__(self) -> None:
        num_seqs = self.seq_lens.shape[0]
        _expect(self.cu_seqlens_q, "cu_seqlens_q", torch.int32, (num_seqs + 1,))
        _expect(self.seq_lens, "seq_lens", torch.int32, (num_seqs,))
        _expect(self.block_tables, "block_tables", torch.int32, (num_seqs, self.block_tables.shape[1]))
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 1 <= self.max_query_len <= self.max_seq_len:
            raise ValueError(
                f"need 1 <= max_query_len ({self.max_query_len}) <= max_seq_len ({self.max_seq_len})"
            )
        if self.decode.num_seqs + len(self.chunks) != num_seqs:
            raise ValueError(
                f"decode ({self.decode.num_seqs}) + chunks ({len(self.chunks)}) != num_seqs ({num_seqs})"
            )

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    def check_invariants(self) -> None:
        """Assert every invariant of the class docstring on the tensors' values."""
        cu = self.cu_seqlens_q.tolist()
        seq_lens = self.seq_lens.tolist()
        query_lens = [end - start for start, end in zip(cu, cu[1:])]
        assert cu[0] == 0 and cu[-1] == self.num_tokens, (cu, self.num_tokens)
        assert all(1 <= q <= s for q, s in zip(query_lens, seq_lens)), (query_lens, seq_lens)
        assert self.max_query_len == max(query_lens) and self.max_seq_len == max(seq_lens)
        needed = [-(-s // self.block_size) for s in seq_lens]
        assert max(needed) <= self.block_tables.shape[1], (needed, self.block_tables.shape)
        assert int(self.block_tables.min()) >= 0, "negative block id"
        decode_rows = [cu[i] for i, q in enumerate(query_lens) if q == 1]
        assert self.decode.query_rows.tolist() == decode_rows, "decode rows"
        assert [c.seq_index for c in self.chunks] == [i for i, q in enumerate(query_lens) if q > 1]
        for chunk in self.chunks:
            i = chunk.seq_index
            assert (chunk.query_start, chunk.query_end, chunk.seq_len) == (cu[i], cu[i + 1], seq_lens[i])

    @property
    def device(self) -> torch.device:
        return self.seq_lens.device

    @classmethod
    def from_lists(
        cls,
        query_lens: Sequence[int],
        seq_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Validate a step's host-side description and build its tensors on `device`.

        block_tables[i] lists sequence i's blocks in position order; it needs at least
        ceil(seq_lens[i] / block_size) entries (more are allowed and ignored).
        """
        _check_lists(query_lens, seq_lens, block_tables, block_size)
        max_blocks = max(len(row) for row in block_tables)
        padded = [list(row) + [0] * (max_blocks - len(row)) for row in block_tables]
        cu_seqlens = [0]
        for query_len in query_lens:
            cu_seqlens.append(cu_seqlens[-1] + query_len)
        return cls(
            cu_seqlens_q=torch.tensor(cu_seqlens, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(list(seq_lens), dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
            block_size=block_size,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            num_tokens=cu_seqlens[-1],
            decode=_decode_batch(query_lens, seq_lens, padded, block_size, cu_seqlens, device),
            chunks=tuple(
                PrefillChunk(i, cu_seqlens[i], cu_seqlens[i + 1], seq_len)
                for i, (query_len, seq_len) in enumerate(zip(query_lens, seq_lens))
                if query_len > 1
            ),
        )


def _check_lists(
    query_lens: Sequence[int], seq_lens: Sequence[int], block_tables: Sequence[Sequence[int]], block_size: int
) -> None:
    """Raise ValueError naming the field and the sequence for any inconsistent input."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    num_seqs = len(query_lens)
    if num_seqs == 0:
        raise ValueError("query_lens is empty: a step has at least one sequence")
    if len(seq_lens) != num_seqs or len(block_tables) != num_seqs:
        raise ValueError(
            f"query_lens, seq_lens, block_tables differ in length: "
            f"{num_seqs}, {len(seq_lens)}, {len(block_tables)}"
        )
    for i, (query_len, seq_len, row) in enumerate(zip(query_lens, seq_lens, block_tables)):
        if not 1 <= query_len <= seq_len:
            raise ValueError(f"sequence {i}: need 1 <= query_len ({query_len}) <= seq_len ({seq_len})")
        needed = -(-seq_len // block_size)
        if len(row) < needed:
            raise ValueError(
                f"sequence {i}: block_tables row has {len(row)} blocks, seq_len {seq_len} "
                f"needs {needed} of size {block_size}"
            )
        if any(block < 0 for block in row[:needed]):
            raise ValueError(f"sequence {i}: negative block id in block_tables {list(row[:needed])}")


def _decode_batch(
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    padded_tables: list[list[int]],
    block_size: int,
    cu_seqlens: list[int],
    device: torch.device | str,
) -> DecodeBatch:
    """Gather the query_len == 1 sequences into one batch, block tables cut to the longest."""
    ids = [i for i, query_len in enumerate(query_lens) if query_len == 1]
    max_seq_len = max((seq_lens[i] for i in ids), default=0)
    num_blocks = -(-max_seq_len // block_size)
    decode_lens = torch.tensor([seq_lens[i] for i in ids], dtype=torch.int64, device=device)
    key_pos = torch.arange(num_blocks * block_size, device=device)  # [L]
    return DecodeBatch(
        query_rows=torch.tensor([cu_seqlens[i] for i in ids], dtype=torch.int64, device=device),
        seq_lens=decode_lens,
        block_tables=torch.tensor(
            [padded_tables[i][:num_blocks] for i in ids], dtype=torch.int64, device=device
        ).view(len(ids), num_blocks),
        key_mask=(key_pos[None, :] < decode_lens[:, None])[:, None, None, :],  # [B, 1, 1, L]
        max_seq_len=max_seq_len,
    )


def _expect(tensor: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
        raise ValueError(
            f"{name}: expected {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}"
        )
