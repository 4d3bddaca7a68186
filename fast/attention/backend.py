"""The attention-backend contract shared by every implementation, and its argument checks.

Layout (per layer):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    slot s = block * block_size + offset names one token's K/V row in the cache
    q, out:           [num_tokens, num_heads, head_dim] (last dim contiguous), num_heads a
                      multiple of num_kv_heads: query head h reads kv head h // (num_heads // num_kv_heads)

Cache slots that no sequence's context covers must hold finite values (allocate the cache with
torch.zeros): the torch backend reads whole blocks and masks the scores, and 0 * inf is NaN.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from fast.attention.metadata import AttentionMetadata

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class AttentionBackend(ABC):
    """Paged attention over a flattened batch that mixes decode tokens and prefill chunks."""

    name: ClassVar[str]

    @abstractmethod
    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Write key/value [num_tokens, num_kv_heads, head_dim] into their cache slots.

        slot_mapping: int32/int64 [num_tokens]; a negative slot skips that token (padding).
        Non-negative slots must be distinct.
        """

    @abstractmethod
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
        """Causal attention of each query row over its sequence's cached context; returns `out`.

        q: [num_tokens, num_heads, head_dim] with num_tokens >= metadata.num_tokens; rows past
        metadata.num_tokens are padding and are not written. The new tokens' K/V must already be
        stored. Softmax of q·k·scale in fp32; out (allocated like q when None) in q's dtype.
        """


def check_store_kv_args(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Raise ValueError naming the argument when shapes, dtypes or devices disagree."""
    check_cache(k_cache, v_cache)
    _, _, num_kv_heads, head_dim = k_cache.shape
    for name, tensor in (("key", key), ("value", value)):
        if tensor.dim() != 3 or tuple(tensor.shape[1:]) != (num_kv_heads, head_dim):
            raise ValueError(
                f"{name}: expected [num_tokens, {num_kv_heads}, {head_dim}], got {list(tensor.shape)}"
            )
        if tensor.dtype != k_cache.dtype or tensor.device != k_cache.device:
            raise ValueError(
                f"{name}: {tensor.dtype} on {tensor.device}, cache is {k_cache.dtype} on {k_cache.device}"
            )
    if value.shape[0] != key.shape[0] or tuple(slot_mapping.shape) != (key.shape[0],):
        raise ValueError(
            f"key {list(key.shape)}, value {list(value.shape)} and slot_mapping "
            f"{list(slot_mapping.shape)} disagree on num_tokens"
        )
    if slot_mapping.dtype not in (torch.int32, torch.int64) or slot_mapping.device != k_cache.device:
        raise ValueError(f"slot_mapping: expected int32/int64 on {k_cache.device}, got {slot_mapping.dtype} on {slot_mapping.device}")


def check_forward_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    sliding_window: int | None,
    out: torch.Tensor | None,
) -> None:
    """Raise ValueError naming the argument when shapes, dtypes or devices disagree.

    Checks only what is known on the host (no device synchronisation)."""
    check_cache(k_cache, v_cache)
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    if q.dim() != 3 or q.shape[2] != head_dim or q.shape[1] % num_kv_heads != 0:
        raise ValueError(
            f"q: expected [num_tokens, k * {num_kv_heads}, {head_dim}], got {list(q.shape)}"
        )
    if q.dtype != k_cache.dtype or q.device != k_cache.device:
        raise ValueError(f"q: {q.dtype} on {q.device}, cache is {k_cache.dtype} on {k_cache.device}")
    if q.stride(2) != 1:
        raise ValueError(f"q: last dimension must be contiguous, strides {q.stride()}")
    if q.shape[0] < metadata.num_tokens:
        raise ValueError(f"q has {q.shape[0]} rows, metadata.num_tokens is {metadata.num_tokens}")
    if metadata.block_size != block_size:
        raise ValueError(f"metadata.block_size {metadata.block_size} != cache block size {block_size}")
    if metadata.device != q.device:
        raise ValueError(f"metadata on {metadata.device}, q on {q.device}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")
    if out is not None and (
        out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(2) != 1
    ):
        raise ValueError(
            f"out: expected {q.dtype} {list(q.shape)} on {q.device} with contiguous last dim, "
            f"got {out.dtype} {list(out.shape)} on {out.device}, strides {out.stride()}"
        )


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Both caches: same shape, dtype, device; 4-D [num_blocks, block_size, num_kv_heads, head_dim]; contiguous."""
    if k_cache.dim() != 4:
        raise ValueError(
            f"k_cache: expected [num_blocks, block_size, num_kv_heads, head_dim], got {list(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype or v_cache.device != k_cache.device:
        raise ValueError(
            f"v_cache {v_cache.dtype} {list(v_cache.shape)} on {v_cache.device} differs from "
            f"k_cache {k_cache.dtype} {list(k_cache.shape)} on {k_cache.device}"
        )
    if k_cache.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"cache dtype {k_cache.dtype} not in {SUPPORTED_DTYPES}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
