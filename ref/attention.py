"""Dense attention: the oracle for every attention path in the project.

Contiguous K/V, an explicit boolean mask, softmax in fp32. Nothing clever: the ref model
uses it, and the paged kernels in `fast/attention/` are tested against it.
"""

from __future__ import annotations

import torch


def causal_mask(
    q_positions: torch.Tensor, k_positions: torch.Tensor, sliding_window: int | None = None
) -> torch.Tensor:
    """Mask [B, Tq, Tk], True where query at position p may see the key at position j.

    Causal: j <= p. With a sliding window w, also j > p - w (the window holds w positions).
    q_positions: [B, Tq]; k_positions: [B, Tk] or [Tk].
    """
    q = q_positions[:, :, None]  # [B, Tq, 1]
    k = k_positions[None, None, :] if k_positions.dim() == 1 else k_positions[:, None, :]
    mask = k <= q
    if sliding_window is not None:
        mask &= k > q - sliding_window
    return mask


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(q kᵀ · scale, masked) v, computed in fp32, returned in q's dtype.

    q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D] with Hq a multiple of Hkv (GQA: query head h
    reads kv head h // (Hq // Hkv)); mask: [B, Tq, Tk] bool, True = attend. A query row with
    no visible key yields zeros.
    """
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    group = num_heads // num_kv_heads
    k = k.float().repeat_interleave(group, dim=1)  # [B, Hq, Tk, D]
    v = v.float().repeat_interleave(group, dim=1)  # [B, Hq, Tk, D]
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale  # [B, Hq, Tq, Tk]
    scores = scores.masked_fill(~mask[:, None, :, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows
    return torch.matmul(probs, v).to(q.dtype)  # [B, Hq, Tq, D]


def sequence_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of one sequence's new queries over its whole context, token-major layout.

    q: [q_len, Hq, D] are the last q_len tokens of the context; k, v: [seq_len, Hkv, D].
    Query i sits at position seq_len - q_len + i. Returns [q_len, Hq, D].
    """
    q_len, seq_len = q.shape[0], k.shape[0]
    assert q_len <= seq_len, (q_len, seq_len)
    q_pos = torch.arange(seq_len - q_len, seq_len)[None, :]  # [1, q_len]
    k_pos = torch.arange(seq_len)
    mask = causal_mask(q_pos, k_pos, sliding_window)  # [1, q_len, seq_len]
    out = dense_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask, scale
    )  # [1, Hq, q_len, D]
    return out[0].transpose(0, 1)  # [q_len, Hq, D]
