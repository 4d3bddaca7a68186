"""Paged attention in vectorized torch: the fast choice on CPU.

Decode sequences (one query each) run as one batch: their blocks are gathered into a reused
workspace, padded to the longest decode context, and one `scaled_dot_product_attention` call
with a length mask attends all of them. Prefill chunks run one sequence at a time (few per step),
each over its own gathered context: `is_causal` when the chunk is the whole context, else an
explicit causal mask (SDPA's `is_causal` aligns the diagonal top-left, but a chunk over cached
context needs it bottom-right).

GQA without copies: in the decode batch, the G = num_heads // num_kv_heads query heads of one kv
head are folded into the query-length axis, so SDPA sees num_kv_heads heads on both sides
(prefill chunks use SDPA's own `enable_gqa`, which keeps its fused kernel):

    q rows of one kv head h:   [G * query_len]  (g-major: row g * query_len + t is head h*G+g, token t)

SDPA on CPU accumulates fp16/bf16 in fp32 (measured: within the dtype's rounding of an fp64
oracle), so reduced-precision caches are not upcast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fast.attention.backend import AttentionBackend, check_forward_args, check_store_kv_args
from fast.attention.metadata import AttentionMetadata, DecodeBatch, PrefillChunk


class GatherWorkspace:
    """Grow-only buffers that receive gathered cache blocks, reused across layers and steps.

    A fresh multi-MiB tensor per layer costs page faults that outweigh the copy itself (measured:
    3-4x slower gathers at batch 32 x 1024 tokens). Not thread-safe; one per backend object.
    Its size is the largest gather seen: about 2 x the decode batch's padded context.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def gather_blocks(self, name: str, cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """cache[block_ids] as [*block_ids.shape, block_size, num_kv_heads, head_dim], into buffer `name`."""
        shape = (*block_ids.shape, *cache.shape[1:])
        numel = block_ids.numel() * math.prod(cache.shape[1:])
        key = (name, cache.dtype, cache.device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=cache.dtype, device=cache.device)
            self._buffers[key] = buffer
        flat = buffer[:numel].view(block_ids.numel(), *cache.shape[1:])
        torch.index_select(cache, 0, block_ids.reshape(-1), out=flat)
        return flat.view(shape)


@dataclass(frozen=True)
class _LayerInputs:
    """One forward call's tensors and settings, handed to the decode and chunk paths."""

    q: torch.Tensor  # [num_tokens, Hq, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    scale: float
    sliding_window: int | None


class TorchAttentionBackend(AttentionBackend):
    """Gather-by-block-table, then SDPA. Exact within ATTENTION_TOL of the dense reference."""

    name = "torch"

    def __init__(self) -> None:
        self.workspace = GatherWorkspace()

    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        check_store_kv_args(key, value, k_cache, v_cache, slot_mapping)
        slots = slot_mapping.long()
        keep = slots >= 0
        if not bool(keep.all()):
            slots, key, value = slots[keep], key[keep], value[keep]
        _, _, num_kv_heads, head_dim = k_cache.shape
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, key)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, value)

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
        inputs = _LayerInputs(q, k_cache, v_cache, scale, sliding_window)
        if metadata.decode.num_seqs > 0:
            out.index_copy_(0, metadata.decode.query_rows, self._decode(inputs, metadata.decode))
        for chunk in metadata.chunks:
            block_table = metadata.block_tables[chunk.seq_index]
            out[chunk.query_start : chunk.query_end] = self._chunk(inputs, block_table, chunk)
        return out

    def _decode(self, inputs: _LayerInputs, decode: DecodeBatch) -> torch.Tensor:
        """All decode queries in one SDPA call over contexts padded to the longest; [B, Hq, D]."""
        q, k_cache, v_cache, sliding_window = inputs.q, inputs.k_cache, inputs.v_cache, inputs.sliding_window
        batch, num_blocks = decode.block_tables.shape
        _, block_size, num_kv_heads, head_dim = k_cache.shape
        padded_len = num_blocks * block_size
        k = self.workspace.gather_blocks("k", k_cache, decode.block_tables)  # [B, nb, bs, Hkv, D]
        v = self.workspace.gather_blocks("v", v_cache, decode.block_tables)  # [B, nb, bs, Hkv, D]
        k = k.view(batch, padded_len, num_kv_heads, head_dim).transpose(1, 2)  # [B, Hkv, L, D]
        v = v.view(batch, padded_len, num_kv_heads, head_dim).transpose(1, 2)  # [B, Hkv, L, D]
        visible = decode.key_mask  # [B, 1, 1, L]: the query (last position) sees all its context
        if sliding_window is not None:
            key_pos = torch.arange(padded_len, device=q.device)  # [L]
            first_visible = decode.seq_lens[:, None] - sliding_window  # [B, 1]
            visible = visible & (key_pos[None, :] >= first_visible)[:, None, None, :]
        group = q.shape[1] // num_kv_heads
        q_dec = q[decode.query_rows].view(batch, num_kv_heads, group, head_dim)  # [B, Hkv, G, D]
        attended = F.scaled_dot_product_attention(q_dec, k, v, attn_mask=visible, scale=inputs.scale)  # [B, Hkv, G, D]
        return attended.reshape(batch, num_kv_heads * group, head_dim)  # [B, Hq, D]

    def _chunk(self, inputs: _LayerInputs, block_table: torch.Tensor, chunk: PrefillChunk) -> torch.Tensor:
        """One prefill chunk over its whole context; [query_len, Hq, D]."""
        q, k_cache, v_cache, sliding_window = inputs.q, inputs.k_cache, inputs.v_cache, inputs.sliding_window
        _, block_size, num_kv_heads, head_dim = k_cache.shape
        num_blocks = -(-chunk.seq_len // block_size)
        blocks = block_table[:num_blocks].long()
        k = self.workspace.gather_blocks("k", k_cache, blocks).view(-1, num_kv_heads, head_dim)
        v = self.workspace.gather_blocks("v", v_cache, blocks).view(-1, num_kv_heads, head_dim)
        k = k[: chunk.seq_len].transpose(0, 1)  # [Hkv, seq_len, D]
        v = v[: chunk.seq_len].transpose(0, 1)  # [Hkv, seq_len, D]
        # 4-D [1, heads, len, D] with enable_gqa: SDPA's fused CPU kernel (the 3-D GQA fold with a
        # boolean mask takes its unfused path, measured 4x slower on a 1000-token prompt).
        q_chunk = q[chunk.query_start : chunk.query_end].transpose(0, 1).unsqueeze(0)  # [1, Hq, q_len, D]
        k, v = k.unsqueeze(0), v.unsqueeze(0)  # [1, Hkv, seq_len, D]
        query_len = chunk.query_len
        if query_len == chunk.seq_len and sliding_window is None:
            # No cached context: is_causal's top-left diagonal is the bottom-right one.
            attended = F.scaled_dot_product_attention(q_chunk, k, v, is_causal=True, scale=inputs.scale,
                                                      enable_gqa=True)
        else:
            key_pos = torch.arange(chunk.seq_len, device=q.device)  # [seq_len]
            query_pos = key_pos[chunk.seq_len - query_len :, None]  # [query_len, 1]
            visible = key_pos[None, :] <= query_pos  # [query_len, seq_len]
            if sliding_window is not None:
                visible &= key_pos[None, :] > query_pos - sliding_window
            attended = F.scaled_dot_product_attention(q_chunk, k, v, attn_mask=visible, scale=inputs.scale,
                                                      enable_gqa=True)
        return attended[0].transpose(0, 1)  # [query_len, Hq, D]
