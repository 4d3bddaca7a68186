"""Which GEMM runs a linear layer: on CPU, oneDNN with the weight prepacked once at load time.

`F.linear` on a CPU tensor goes to MKL's sgemm with the weight in its checkpoint layout
[out, in], repacked on every call. oneDNN can keep the weight in its own blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, done once) and run the GEMM from there
(`torch.ops.mkldnn._linear_pointwise`). Measured on this project's 2-core AMD EPYC (AVX-512),
the 33 linears of the benchmark model: 5.1 vs 9.3 ms at one token (decode of one request),
18.4 vs 34.4 ms at 64 tokens, 124 vs 168 ms at 512 (prefill): the same GEMMs, 1.35-2x faster
(the GEMM floor in `benchmarks/harness.py` times both per shape). This is what inductor's weight prepacking
does for a frozen model; here it is done by hand, without compiling anything.

Only fp32 and (where the CPU has it) bf16 are packed; other dtypes and other devices keep
`F.linear`. The packed GEMM's sums are ordered differently from MKL's, so results differ by
rounding (fp32: ~1e-6 relative), well inside the comparison rule of conformance/compare.py.
The input must be contiguous: oneDNN copies a strided one, ~10x slower (callers pass
contiguous activations).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def can_prepack(weight: torch.Tensor) -> bool:
    """Whether `weight` ([out, in]) can be prepacked for oneDNN on this machine."""
    if weight.device.type != "cpu" or weight.dim() != 2 or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] in oneDNN's blocked layout (an opaque mkldnn tensor of the same shape)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T + bias with W prepacked by `prepack` (x [..., in], contiguous)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's GEMM: the packed oneDNN path when a packed weight exists, else `F.linear`."""
    if packed is None:
        return F.linear(x, weight, bias)
    return packed_linear(x, packed, bias)
