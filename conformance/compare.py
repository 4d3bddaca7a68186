"""Tolerances and the comparison rule: written once here, used by every test and check.

The rule (SPEC.md, "Comparing outputs"):
- fp32 logits/logprobs agree within `LOGIT_ATOL[dtype]`.
- Greedy (and seeded) tokens are identical, unless at the first differing index the oracle's
  two best decision scores are within `near_tie_margin(dtype)` of each other (a near-tie): then
  the outputs may diverge from that index on, and only from there.
"""

from __future__ import annotations

from typing import Callable

import torch

# Absolute tolerance on logits computed in each dtype (fp32 accumulation everywhere).
LOGIT_ATOL = {
    torch.float32: 1e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 1e-1,
}

# Attention-kernel outputs vs the dense reference, per dtype: (atol, rtol).
# fp32: two correct fp32 attentions differ by up to 1.4e-5 (relative to 1 + |out|) on 600-token
# contexts with peaky scores (q x4; 150 random cases: torch's CPU SDPA uses a fast approximate
# exp), so 1e-5 was too tight; 3e-5 keeps a 2x margin. fp16/bf16: worst seen 6e-4 / 5e-3.
ATTENTION_TOL = {
    torch.float32: (3e-5, 3e-5),
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


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where the token lists differ (incl. one ending early)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def oracle_decision_gap(model, prompt_ids: list[int], output_ids: list[int], step: int,
                        params, eos_token_ids: tuple[int, ...], seed: int | None) -> float:
    """Gap between the oracle's two best choices for output token `step`, in logit units.

    Recomputes the oracle's decision teacher-forced on prompt + output_ids[:step]: for greedy the
    processed logits; for seeded sampling log(probs / noise) scaled back by the temperature, with
    the request's generator advanced past the `step` earlier draws (one draw per token).
    """
    from ref.sampler import decision_scores, exponential_noise

    logits = model.teacher_forced_logits(prompt_ids + output_ids[:step])[-1]
    gen = None
    if not params.greedy:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(step):
            exponential_noise(gen, logits.shape[-1])
    scores = decision_scores(logits, params, prompt_ids, output_ids[:step], eos_token_ids, gen)
    if not params.greedy:
        scores = torch.log(scores) * params.temperature
    top2 = torch.topk(scores.float(), 2).values
    return float(top2[0] - top2[1])


def check_tokens_equal(name: str, oracle_ids: list[int], candidate_ids: list[int],
                       gap_at: Callable[[int], float], dtype: torch.dtype) -> int | None:
    """The SPEC comparison rule. Returns None if identical, else the index of an allowed
    near-tie divergence; raises AssertionError naming the request, index and both tokens."""
    j = first_divergence(oracle_ids, candidate_ids)
    if j is None:
        return None
    if j >= len(oracle_ids) or j >= len(candidate_ids):
        raise AssertionError(
            f"{name}: outputs agree on {j} tokens but have different lengths "
            f"(oracle {len(oracle_ids)}, candidate {len(candidate_ids)})"
        )
    gap = gap_at(j)
    if gap > near_tie_margin(dtype):
        raise AssertionError(
            f"{name}: token {j} differs: oracle={oracle_ids[j]} candidate={candidate_ids[j]}; "
            f"the oracle's top-2 gap {gap:.3g} exceeds the near-tie margin {near_tie_margin(dtype):g}"
        )
    return j


def _check_logprob_lists(name: str, oracle, candidate, upto: int, atol: float) -> None:
    """Per position: same sampled-token logprob within atol, same top-k values within atol."""
    if (oracle is None) != (candidate is None):
        raise AssertionError(f"{name}: logprobs present in one output only")
    if oracle is None:
        return
    for j in range(upto):
        o, c = oracle[j], candidate[j]
        if o is None or c is None:
            if (o is None) != (c is None):
                raise AssertionError(f"{name}: logprobs[{j}] is None in one output only")
            continue
        if len(o) != len(c):
            raise AssertionError(f"{name}: logprobs[{j}] has {len(c)} entries, oracle {len(o)}")
        first_o, first_c = next(iter(o)), next(iter(c))
        if first_o != first_c or abs(o[first_o].logprob - c[first_c].logprob) > atol:
            raise AssertionError(
                f"{name}: logprobs[{j}] token {first_c} logprob {c[first_c].logprob:.6g} vs oracle "
                f"token {first_o} {o[first_o].logprob:.6g}"
            )
        ov = sorted((lp.logprob for lp in o.values()), reverse=True)
        cv = sorted((lp.logprob for lp in c.values()), reverse=True)
        assert_close(f"{name}: logprobs[{j}] values", torch.tensor(cv), torch.tensor(ov), atol)


def check_completion(name: str, model, prompt_ids: list[int], params, eos_token_ids,
                     oracle, candidate, dtype: torch.dtype = torch.float32) -> int | None:
    """Compare one CompletionOutput with the oracle's under the SPEC rule.

    `params` are this sample's params (`SamplingParams.for_sample(index)`). Unseeded random
    samples are not comparable token-for-token and only their shape is checked. Returns the
    index of an allowed near-tie divergence, or None when the outputs agree entirely.
    """
    if not params.greedy and params.seed is None:
        return None
    gap_at = lambda j: oracle_decision_gap(model, prompt_ids, oracle.token_ids, j, params,  # noqa: E731
                                           tuple(eos_token_ids), params.seed)
    j = check_tokens_equal(name, oracle.token_ids, candidate.token_ids, gap_at, dtype)
    atol = LOGIT_ATOL[dtype]
    upto = len(oracle.token_ids) if j is None else j
    _check_logprob_lists(name, oracle.logprobs, candidate.logprobs, upto, atol)
    if j is not None:
        return j
    for field in ("text", "finish_reason", "stop_reason"):
        if getattr(oracle, field) != getattr(candidate, field):
            raise AssertionError(
                f"{name}: {field} differs: candidate={getattr(candidate, field)!r} "
                f"oracle={getattr(oracle, field)!r}"
            )
    if (oracle.cumulative_logprob is None) != (candidate.cumulative_logprob is None) or (
        oracle.cumulative_logprob is not None
        and abs(oracle.cumulative_logprob - candidate.cumulative_logprob) > atol * max(1, upto)
    ):
        raise AssertionError(
            f"{name}: cumulative_logprob {candidate.cumulative_logprob} vs oracle {oracle.cumulative_logprob}"
        )
    return None


def check_request_outputs(model, eos_token_ids, requests: list[tuple[list[int], object]],
                          oracle_outputs, candidate_outputs, dtype: torch.dtype = torch.float32) -> None:
    """Every request's every sample, plus prompt logprobs; `requests` holds (prompt_ids, params)."""
    if len(oracle_outputs) != len(candidate_outputs):
        raise AssertionError(f"{len(candidate_outputs)} outputs, oracle has {len(oracle_outputs)}")
    for (prompt_ids, params), o, c in zip(requests, oracle_outputs, candidate_outputs):
        name = f"request {o.request_id}"
        if o.prompt_token_ids != c.prompt_token_ids:
            raise AssertionError(f"{name}: prompt_token_ids differ")
        if len(o.outputs) != len(c.outputs):
            raise AssertionError(f"{name}: {len(c.outputs)} samples, oracle has {len(o.outputs)}")
        _check_logprob_lists(f"{name} prompt", o.prompt_logprobs, c.prompt_logprobs,
                             len(prompt_ids) if o.prompt_logprobs is not None else 0, LOGIT_ATOL[dtype])
        for i, (oc, cc) in enumerate(zip(o.outputs, c.outputs)):
            check_completion(f"{name} sample {i}", model, prompt_ids, params.for_sample(i),
                             eos_token_ids, oc, cc, dtype)
