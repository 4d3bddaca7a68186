"""Tolerances and the comparison rule: written once here, used by every test and check.

The rule (SPEC.md, "Comparing outputs"):
- fp32 logits/logprobs agree within `LOGIT_ATOL[dtype]`.
- Greedy (and seeded) tokens are identical, unless at the first differing index the oracle's
  two best decision scores are within `near_tie_margin(dtype)` of each other (a near-tie): then
  the outputs may diverge from that index on, and only from there.
"""

from __future__ import annotations

import torch

# Absolute tolerance on logits computed in each dtype (fp32 accumulation everywhere).
LOGIT_ATOL = {
    torch.float32: 1e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 1e-1,
}

# Attention-kernel outputs vs the dense reference, per dtype: (atol, rtol).
ATTENTION_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


def near_tie_margin(dtype: torch.dtype) -> float:
    """Two candidates closer than this may legitimately swap order between two correct engines:
    each engine's score may be off by LOGIT_ATOL, so their gap may be off by twice that."""
    return 2 * LOGIT_ATOL[dtype]


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    """torch.testing-style check that names the tensor, the worst index and both values."""
    actual, expected = actual.float(), expected.float()
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    diff = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = diff > bound
    if bool(bad.any()):
        worst = int((diff - bound).argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{diff.numel()} elements differ; worst at {idx}: "
            f"actual={actual[idx].item():.6g} expected={expected[idx].item():.6g} "
            f"|diff|={diff[idx].item():.3g} > atol={atol:g} + rtol={rtol:g}*|expected|"
        )
