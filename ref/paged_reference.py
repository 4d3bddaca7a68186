"""The paged KV cache read and written the trivially correct way, and the batch oracle built on it.

This is the reference: one Python list of slots per sequence, plain indexing, and
`ref.attention.sequence_attention` per sequence. The paged kernels in `fast/attention/` are
tested against it.

Cache layout: [num_blocks, block_size, num_kv_heads, head_dim]; the token at position p of a
sequence lives at block block_table[p // block_size], offset p % block_size, i.e. in slot
block_table[p // block_size] * block_size + p % block_size of the cache viewed as
[num_blocks * block_size, num_kv_heads, head_dim].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ref.attention import sequence_attention


def sequence_slots(block_table: Sequence[int], positions: Sequence[int], block_size: int) -> list[int]:
    """The cache slot of each position of one sequence."""
    return [block_table[p // block_size] * block_size + p % block_size for p in positions]


def write_sequence(cache: torch.Tensor, block_table: Sequence[int], values: torch.Tensor) -> None:
    """Write values [seq_len, num_kv_heads, head_dim] as positions 0..seq_len-1 of one sequence."""
    num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    slots = sequence_slots(block_table, range(values.shape[0]), block_size)
    flat = cache.view(num_blocks * block_size, num_kv_heads, head_dim)  # [slots, Hkv, D]
    flat[torch.tensor(slots, dtype=torch.long, device=cache.device)] = values


def read_sequence(cache: torch.Tensor, block_table: Sequence[int], seq_len: int) -> torch.Tensor:
    """Positions 0..seq_len-1 of one sequence, contiguous: [seq_len, num_kv_heads, head_dim]."""
    num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    slots = sequence_slots(block_table, range(seq_len), block_size)
    flat = cache.view(num_blocks * block_size, num_kv_heads, head_dim)  # [slots, Hkv, D]
    return flat[torch.tensor(slots, dtype=torch.long, device=cache.device)]


def batch_attention(
    q: torch.Tensor,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    query_lens: Sequence[int],
    scale: float,
    sliding_window: int | None = None,
) -> list[torch.Tensor]:
    """Each sequence's attention output, from its contiguous K/V: one [query_len, Hq, D] each.

    q: [sum(query_lens), Hq, D], sequences in order; keys[i], values[i]: [seq_len_i, Hkv, D].
    """
    outputs = []
    start = 0
    for k, v, query_len in zip(keys, values, query_lens):
        outputs.append(sequence_attention(q[start : start + query_len], k, v, scale, sliding_window))
        start += query_len
    return outputs
