"""Paged attention: the KV-cache store and the attention over it, behind one small registry.

    backend = get_backend("auto", device)          # "triton" on CUDA, AUTO_CPU ("cpu") otherwise
    backend.store_kv(key, value, k_cache, v_cache, slot_mapping)
    out = backend.forward(q, k_cache, v_cache, metadata, scale, sliding_window)

Triton is imported only when the "triton" backend is asked for, so TRITON_INTERPRET (read when
the kernels are defined) can still be set by whoever runs the Triton backend on CPU.
"""

from __future__ import annotations

import warnings

import torch

from fast.attention.backend import AttentionBackend
from fast.attention.metadata import AttentionMetadata, DecodeBatch, PrefillChunk
from fast.attention.torch_backend import TorchAttentionBackend

BACKEND_NAMES = ("auto", "torch", "triton", "cpu")

# What "auto" picks on a CPU device: the "cpu" backend (C++ paged decode kernel), which beats the
# torch backend on every decode case of benchmarks/bench_attention.py, and dense contiguous SDPA
# and compiled FlexAttention over the paged cache too (README, Performance). Where its kernel cannot
# be built (no compiler, no ninja), "auto" warns and uses "torch".
AUTO_CPU = "cpu"

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
    """A new backend by name; "auto" picks "triton" for a CUDA device, AUTO_CPU otherwise ("cpu",
    or "torch" with a RuntimeWarning when the C++ kernel cannot be built).

    device None means CUDA when available, else CPU. The "triton" backend on a CPU device needs
    TRITON_INTERPRET=1 set before its module is first imported (it raises otherwise).
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; allowed: {', '.join(BACKEND_NAMES)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            name = "triton"
        elif AUTO_CPU == "cpu":
            return _cpu_or_torch()  # the kernel, or torch with a warning where it cannot be built
        else:
            name = AUTO_CPU
    if name == "torch":
        return TorchAttentionBackend()
    if name == "cpu":  # the C++ paged decode kernel (fast/attention/cpu_backend.py); builds on first use
        from fast.attention.cpu_backend import CpuAttentionBackend

        return CpuAttentionBackend()
    from fast.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend(device)


def _cpu_or_torch() -> AttentionBackend:
    """The cpu backend, or the torch backend (with a warning) where its kernel cannot be built."""
    from fast.attention.cpu_backend import CpuAttentionBackend, CpuKernelUnavailable

    try:
        return CpuAttentionBackend()
    except CpuKernelUnavailable as err:
        warnings.warn(f"{err}; attention_backend='auto' uses the torch backend", RuntimeWarning, stacklevel=3)
        return TorchAttentionBackend()
