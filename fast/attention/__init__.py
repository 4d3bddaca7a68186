"""Paged attention: the KV-cache store and the attention over it, behind one small registry.

    backend = get_backend("auto", device)          # "triton" on CUDA, "torch" otherwise (see get_backend)
    backend.store_kv(key, value, k_cache, v_cache, slot_mapping)
    out = backend.forward(q, k_cache, v_cache, metadata, scale, sliding_window)

Triton is imported only when the "triton" backend is asked for, so TRITON_INTERPRET (read when
the kernels are defined) can still be set by whoever runs the Triton backend on CPU.
"""

from __future__ import annotations

import torch

from fast.attention.backend import AttentionBackend
from fast.attention.metadata import AttentionMetadata, DecodeBatch, PrefillChunk
from fast.attention.torch_backend import TorchAttentionBackend

BACKEND_NAMES = ("auto", "torch", "triton", "cpu")

__all__ = [
    "BACKEND_NAMES",
    "AttentionBackend",
    "AttentionMetadata",
    "DecodeBatch",
    "PrefillChunk",
    "TorchAttentionBackend",
    "get_backend",
]


def get_backend(name: str = "auto", device: torch.device | str | None = None) -> AttentionBackend:
    """A new backend by name; "auto" picks "triton" for a CUDA device, "torch" otherwise.

    device None means CUDA when available, else CPU. The "triton" backend on a CPU device needs
    TRITON_INTERPRET=1 set before its module is first imported (it raises otherwise).
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; allowed: {', '.join(BACKEND_NAMES)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "cpu":  # the C++ paged decode kernel (fast/attention/cpu_backend.py); builds on first use
        from fast.attention.cpu_backend import CpuAttentionBackend

        return CpuAttentionBackend()
    from fast.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend(device)
