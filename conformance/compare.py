"""Tolerances and the comparison rule: written once here, used by every test and check.

The rule (SPEC.md, "Comparing outputs"):
- fp32 logits/logprobs agree within `LOGIT_ATOL[dtype]`.
- Greedy (and seeded) tokens are identical, unless at the first differing index the candidate's
  token is one of the oracle's near-tied candidates: its oracle decision score is within
  `near_tie_margin(dtype)` of the oracle's best. Then the outputs may diverge from that index
  on, and only from there.
- Near a truncation cut (seeded samples with top-k, top-p or min-p): logits within tolerance
  may keep a token on one engine and cut it on the other. A divergence is also allowed when the
  oracle's processed logits put the oracle's or the candidate's token within tolerance of a cut
  and the candidate's token wins the oracle's race under some such flip of near-cut tokens'
  membership (`near_cut`); never for greedy requests, never where neither token is near a cut.
- Logprob dicts name the same tokens with the same ranks, values and decoded text; a token may
  take another's place or rank only where the oracle's logprobs of the two are near-tied (the
  same margin), and every value must be the oracle's value *for that token*.
- Every request has exactly one output, in request order, with its n completions indexed 0..n-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

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
    """torch.testing-style check that names the tensor, the worst index and both values.

    Equal values pass (so -inf against -inf, a masked logprob, does); NaN never does — not even
    against NaN — since `diff > bound` alone is False for a NaN difference and would let it by."""
    actual, expected = actual.float(), expected.float()
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    diff = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = ~((actual == expected) | (diff <= bound))
    if bool(bad.any()):
        worst = int(torch.where(bad, (diff - bound).nan_to_num(nan=float("inf")), float("-inf")).argmax())
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


@dataclass
class OracleDecision:
    """The oracle's view of one sampling step, recomputed teacher-forced."""

    scores: torch.Tensor  # decision scores [vocab] in logit units (-inf: truncated away)
    processed: torch.Tensor  # logits after the min_tokens mask and the penalties [vocab]
    noise: torch.Tensor | None  # the step's exponential noise draw (None: greedy)


ControlsAt = Callable[[list[int]], Any]  # output prefix -> ref.sampler.TokenControls at that step


def oracle_decision(model, prompt_ids: list[int], output_ids: list[int], step: int,
                    params, eos_token_ids: tuple[int, ...], seed: int | None,
                    controls_at: ControlsAt | None = None) -> OracleDecision:
    """The oracle's decision for output token `step`, recomputed teacher-forced on prompt +
    output_ids[:step]: for greedy the processed logits; for seeded sampling log(probs / noise)
    scaled back by the temperature, with the request's generator advanced past the `step` earlier
    draws (one draw per token). The token taken is the argmax; a token truncated away scores -inf.
    `controls_at(output_ids[:step])`: the grammar's allowed tokens and the bad words at that
    step (SPEC §6 step 1), for constrained requests — without them a masked token would look
    like the oracle's best and a divergence onto it like a near-tie.
    """
    from ref.sampler import NO_CONTROLS, decision_scores, exponential_noise, process_logits

    prefix = output_ids[:step]
    controls = controls_at(prefix) if controls_at is not None else NO_CONTROLS
    logits = model.teacher_forced_logits(prompt_ids + prefix)[-1]
    processed = process_logits(logits, params, prompt_ids, prefix, eos_token_ids, controls).float()
    if params.greedy:
        return OracleDecision(decision_scores(logits, params, prompt_ids, prefix, eos_token_ids,
                                              None, controls).float(), processed, None)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(step):
        exponential_noise(gen, logits.shape[-1])
    state = gen.get_state()
    scores = decision_scores(logits, params, prompt_ids, prefix, eos_token_ids, gen, controls)
    gen.set_state(state)
    noise = exponential_noise(gen, logits.shape[-1])
    return OracleDecision((torch.log(scores) * params.temperature).float(), processed, noise)


def oracle_controls(engine) -> Callable[[list[int], Any], ControlsAt | None]:
    """`controls_for(prompt_ids, params)` over a `ref.LLMEngine`: None for a request without
    bad_words or structured_outputs, else `controls_at(output prefix)` — its bad words' token
    sequences and a fresh grammar of its constraint fed the prefix (the oracle's own code)."""
    from ref.sampler import TokenControls
    from ref.structured import TokenGrammar

    def controls_for(prompt_ids: list[int], params) -> ControlsAt | None:
        if not params.bad_words and params.structured_outputs is None:
            return None
        prepared = engine.process({"prompt_token_ids": list(prompt_ids)}, params)

        def controls_at(prefix: list[int]):
            allowed = None
            if prepared.grammar is not None:
                grammar = TokenGrammar(prepared.grammar, engine.model_config.vocab_size)
                for token in prefix:
                    grammar.accept(token)
                allowed = grammar.allowed_tokens()
            return TokenControls(allowed, prepared.bad_words_ids)

        return controls_at

    return controls_for


def oracle_decision_scores(model, prompt_ids: list[int], output_ids: list[int], step: int,
                           params, eos_token_ids: tuple[int, ...], seed: int | None) -> torch.Tensor:
    """The oracle's decision scores [vocab] for output token `step`, in logit units (see
    `oracle_decision`)."""
    return oracle_decision(model, prompt_ids, output_ids, step, params, eos_token_ids, seed).scores


def oracle_decision_gap(model, prompt_ids: list[int], output_ids: list[int], step: int,
                        params, eos_token_ids: tuple[int, ...], seed: int | None) -> float:
    """Gap between the oracle's two best choices for output token `step`, in logit units."""
    top2 = torch.topk(oracle_decision_scores(model, prompt_ids, output_ids, step, params, eos_token_ids, seed), 2)
    return float(top2.values[0] - top2.values[1])


def near_tied(scores: torch.Tensor, margin: float) -> list[int]:
    """Token ids whose score is within `margin` of the best: the choices a correct engine may make."""
    return [int(t) for t in torch.nonzero(scores >= scores.max() - margin).flatten()]


def _sum_above(z: torch.Tensor, weights: torch.Tensor, thresholds: torch.Tensor, strict: bool) -> torch.Tensor:
    """Per threshold x: the sum of weights[s] over tokens s with z[s] > x (strict) or >= x."""
    order = torch.argsort(z, descending=True)
    cum = torch.cat([weights.new_zeros(1), torch.cumsum(weights[order], 0)])
    # z[order] descending, so -z[order] ascending: z_s >= x  <=>  -z_s <= -x.
    return cum[torch.searchsorted(-z[order], -thresholds, right=not strict)]


def truncation_bounds(processed: torch.Tensor, params, atol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(surely kept, maybe kept): boolean masks [vocab] of the tokens that every engine, and that
    some engine, whose processed logits are each within `atol` of `processed` keeps through SPEC
    §6's truncation (temperature, then top-k, top-p, min-p; `ref.sampler.truncate`).

    In temperature-scaled units z = processed / T each logit may be off by a = atol / T, so two
    are ordered for sure only when more than 2a apart:
    - top-k keeps t iff fewer than k tokens lie strictly above it;
    - top-p keeps t iff the probability mass sorted before it (among top-k's kept) is below top_p:
      the mass is bounded by counting every token that may sit above t (and may pass top-k) at
      e^(z+a) against t and the sure-kept tokens surely below it at e^(z-a), and the reverse;
    - min-p keeps t iff z_t >= z_max + log(min_p), each side off by a.
    """
    T = params.temperature
    z = processed.double() / T
    a = atol / T
    finite = torch.isfinite(z)
    sure, maybe = finite.clone(), finite.clone()
    vocab = z.numel()
    ones = finite.double()
    k = params.top_k
    if 0 < k < vocab:
        # tokens (other than t) that may lie above t / surely lie above t
        may_above = _sum_above(z, ones, z - 2 * a, strict=False) - ones
        sure_above = _sum_above(z, ones, z + 2 * a, strict=True)
        sure &= may_above < k
        maybe &= sure_above < k
    if params.top_p < 1.0:
        w = torch.exp(torch.where(finite, z - z[finite].max(), torch.full_like(z, float("-inf"))))
        up, down = w * torch.exp(torch.tensor(a, dtype=w.dtype)), w * torch.exp(torch.tensor(-a, dtype=w.dtype))
        maybe_w, sure_w = torch.where(maybe, up, 0.0), torch.where(sure, down, 0.0)
        # most mass before t: all that may be above it, high; t and the sure ones surely below, low
        above_hi = _sum_above(z, maybe_w, z - 2 * a, strict=False) - torch.where(maybe, up, 0.0)
        below_lo = down + sure_w.sum() - _sum_above(z, sure_w, z - 2 * a, strict=False)
        # least mass before t: only the sure ones surely above it, low; t and the rest, high
        above_lo = _sum_above(z, sure_w, z + 2 * a, strict=True)
        rest_hi = up + maybe_w.sum() - _sum_above(z, maybe_w, z + 2 * a, strict=True) - torch.where(maybe, up, 0.0)
        most_before = above_hi / (above_hi + below_lo)
        least_before = above_lo / (above_lo + rest_hi)
        sure &= most_before < params.top_p
        maybe &= least_before < params.top_p
    if params.min_p > 0.0:
        cut = z[finite].max() + torch.log(torch.tensor(params.min_p, dtype=z.dtype))
        sure &= z >= cut + 2 * a
        maybe &= z >= cut - 2 * a
    return sure, maybe


def truncates(params) -> bool:
    """A sampled request whose top-k, top-p or min-p may cut tokens (greedy never truncates)."""
    return not params.greedy and (params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0)


@dataclass(frozen=True)
class NearCut:
    """One sampling step's truncation, as two correct engines may see it (`near_cut`)."""

    near: frozenset[int]  # maybe kept, not surely: within tolerance of a top-k/top-p/min-p cut
    allowed: frozenset[int]  # tokens that win the race under some membership of the near-cut ones

    def accepts(self, oracle_token: int, candidate_token: int) -> bool:
        """The divergence is explained by a near-cut token's membership flipping: one of the two
        tokens is near a cut, and the candidate's token can win the race."""
        return (oracle_token in self.near or candidate_token in self.near) and candidate_token in self.allowed


def near_cut(processed: torch.Tensor, noise: torch.Tensor, params, dtype: torch.dtype) -> NearCut:
    """The near-cut tokens of a sampling step and the tokens a correct engine may take there.

    Race scores T·(z - log q) (logit units, the oracle's decision scores up to a constant) decide
    among the kept tokens. A candidate token is allowed when some engine may keep it and its score
    is within the near-tie margin of the best surely kept token's: the oracle's token or others
    near a cut may have been cut by the candidate engine, and the candidate's token may have been
    kept by it. Where neither token is near a cut this is the near-tie rule."""
    sure, maybe = truncation_bounds(processed, params, LOGIT_ATOL[dtype])
    race = processed.double() - params.temperature * torch.log(noise.double())
    best_sure = race[sure].max() if bool(sure.any()) else torch.tensor(float("-inf"), dtype=race.dtype)
    allowed = maybe & (race >= best_sure - near_tie_margin(dtype))
    as_set = lambda mask: frozenset(int(t) for t in torch.nonzero(mask).flatten())  # noqa: E731
    return NearCut(as_set(maybe & ~sure), as_set(allowed))


def check_tokens_equal(name: str, oracle_ids: list[int], candidate_ids: list[int],
                       scores_at: Callable[[int], torch.Tensor | float], dtype: torch.dtype,
                       near_cut_at: Callable[[int], NearCut] | None = None) -> int | None:
    """The SPEC comparison rule. Returns None if identical, else the index of an allowed
    divergence; raises AssertionError naming the request, index and both tokens.

    `scores_at(j)` gives the oracle's decision scores [vocab] at index j: the candidate's token
    must be one of the oracle's near-tied candidates (score within the margin of the best).
    A caller that can only give the oracle's top-2 gap (a float) gets the weaker rule: some
    near-tie exists at j. `near_cut_at(j)` (sampled requests that truncate only) adds the
    near-cut clause: a divergence that a near-cut token's membership explains (`NearCut.accepts`).
    """
    j = first_divergence(oracle_ids, candidate_ids)
    if j is None:
        return None
    if j >= len(oracle_ids) or j >= len(candidate_ids):
        raise AssertionError(
            f"{name}: outputs agree on {j} tokens but have different lengths "
            f"(oracle {len(oracle_ids)}, candidate {len(candidate_ids)})"
        )
    margin = near_tie_margin(dtype)
    scores = scores_at(j)
    if not isinstance(scores, torch.Tensor):  # a top-2 gap only
        if scores > margin:
            raise AssertionError(
                f"{name}: token {j} differs: oracle={oracle_ids[j]} candidate={candidate_ids[j]}; "
                f"the oracle's top-2 gap {scores:.3g} exceeds the near-tie margin {margin:g}"
            )
        return j
    tied = near_tied(scores, margin)
    if candidate_ids[j] in tied:
        return j
    cut = near_cut_at(j) if near_cut_at is not None else None
    if cut is not None and cut.accepts(oracle_ids[j], candidate_ids[j]):
        return j
    below = float(scores.max() - scores[candidate_ids[j]])
    why = ""
    if cut is not None:
        why = (f"; near a top-k/top-p/min-p cut: {sorted(cut.near)[:8]}, which explains no choice of "
               f"{candidate_ids[j]}" if cut.near else "; no token is near a top-k/top-p/min-p cut")
    raise AssertionError(
        f"{name}: token {j} differs: oracle={oracle_ids[j]} candidate={candidate_ids[j]}; the candidate's "
        f"token scores {below:.3g} below the oracle's best, beyond the near-tie margin {margin:g} "
        f"(near-tied: {tied[:8]}){why}"
    )


def _ranked(entry: dict, k: int) -> list[tuple[int, int]]:
    """(rank, token) of the entry's top-k tokens, best first (rank ties by dict order)."""
    return sorted(((lp.rank, t) for t, lp in entry.items() if lp.rank <= k), key=lambda x: x[0])


def rank_bounds(logprobs: torch.Tensor, token: int, margin: float) -> tuple[int, int]:
    """The ranks a correct engine may give `token`: each engine's logprobs are within half the
    margin of the truth, so a token within `margin` of this one may sit on either side of it."""
    others = torch.cat([logprobs[:token], logprobs[token + 1:]])
    lp = float(logprobs[token])
    return 1 + int((others > lp + margin).sum()), 1 + int((others > lp - margin).sum())


def check_logprob_entry(name: str, oracle: dict, candidate: dict, k: int, dtype: torch.dtype,
                        oracle_logprobs: Callable[[], torch.Tensor]) -> None:
    """One position's logprob dict (the sampled/actual token first, then the top-k) vs the oracle's.

    Fast path: the same tokens in the same order with the same ranks, values within atol and the
    same decoded text. Otherwise the oracle's full row `oracle_logprobs()` [vocab] arbitrates:
    every candidate token must carry the oracle's value for that token (within atol) and a rank a
    correct engine could give it (`rank_bounds`), and an oracle top-k token the candidate left
    out must be near-tied with the k-th (it could rank beyond k). The sampled token counts once, so
    the entries number k (it is among the top-k) or k + 1: the candidate's count may differ from
    the oracle's only where the sampled token is near-tied with the k-th.
    """
    atol, margin = LOGIT_ATOL[dtype], near_tie_margin(dtype)
    if len(candidate) - 1 not in (k - 1, k):  # the top-k, the sampled token first unless among them
        raise AssertionError(f"{name}: {len(candidate)} entries for the sampled/actual token and a top-{k}: "
                             f"candidate {list(candidate)} oracle {list(oracle)}")
    first_o, first_c = next(iter(oracle)), next(iter(candidate))
    if first_o != first_c:
        raise AssertionError(f"{name}: first entry is token {first_c}, oracle's is the sampled/actual token {first_o}")
    for t in [t for t in candidate if t in oracle]:  # candidate order: the first bad token is named
        o, c = oracle[t], candidate[t]
        if abs(o.logprob - c.logprob) > atol:
            raise AssertionError(f"{name}: token {t} logprob {c.logprob:.6g} vs oracle {o.logprob:.6g} "
                                 f"(|diff| {abs(o.logprob - c.logprob):.3g} > atol {atol:g})")
        if o.decoded_token != c.decoded_token:
            raise AssertionError(f"{name}: token {t} decoded_token {c.decoded_token!r} vs oracle {o.decoded_token!r}")
    same_ranks = all(oracle[t].rank == candidate[t].rank for t in oracle.keys() & candidate.keys())
    if list(oracle) == list(candidate) and same_ranks:
        return
    row = oracle_logprobs().float()
    # One entry fewer than the oracle's (or more): the sampled token is inside the candidate's
    # top-k (or outside it), which a correct engine may only do where it is near-tied with the k-th.
    lo, hi = rank_bounds(row, first_c, margin)
    if len(candidate) == k and lo > k:
        raise AssertionError(f"{name}: {k} entries: the sampled/actual token {first_c} is listed as one of the "
                             f"top-{k}, but the oracle ranks it {lo} or lower (oracle {list(oracle)})")
    if len(candidate) == k + 1 and hi <= k:
        raise AssertionError(f"{name}: {k + 1} entries: the sampled/actual token {first_c} is left out of the "
                             f"top-{k}, but the oracle ranks it {hi} or higher (oracle {list(oracle)})")
    for t, c in candidate.items():
        if abs(float(row[t]) - c.logprob) > atol:
            raise AssertionError(f"{name}: token {t} carries logprob {c.logprob:.6g} but the oracle's for that "
                                 f"token is {float(row[t]):.6g} (values attached to the wrong tokens?)")
        lo, hi = rank_bounds(row, t, margin)
        if not lo <= c.rank <= hi:
            want = oracle[t].rank if t in oracle else lo
            raise AssertionError(f"{name}: token {t} has rank {c.rank}, oracle rank {want} (allowed {lo}..{hi} "
                                 f"under the near-tie margin {margin:g})")
    kept = {t for _, t in _ranked(candidate, k)}
    for rank, t in _ranked(oracle, k):
        if t not in kept and rank_bounds(row, t, margin)[1] <= k:
            raise AssertionError(f"{name}: oracle top-{k} token {t} (rank {rank}, logprob {float(row[t]):.6g}) is "
                                 f"missing from the candidate's top-{k} {[t for _, t in _ranked(candidate, k)]}, "
                                 f"and nothing near-ties it out")


def _check_logprob_lists(name: str, oracle, candidate, upto: int, k: int | None, dtype: torch.dtype,
                         row_at: Callable[[int], torch.Tensor]) -> None:
    """Positions [0, upto) of two logprob lists; `row_at(j)` is the oracle's logprob row at j."""
    if (oracle is None) != (candidate is None):
        raise AssertionError(f"{name}: logprobs present in one output only")
    if oracle is None:
        return
    if len(candidate) < upto:
        raise AssertionError(f"{name}: {len(candidate)} logprob entries for {upto} positions")
    for j in range(upto):
        o, c = oracle[j], candidate[j]
        if o is None or c is None:
            if (o is None) != (c is None):
                raise AssertionError(f"{name}: logprobs[{j}] is None in one output only")
            continue
        check_logprob_entry(f"{name}: logprobs[{j}]", o, c, k or 0, dtype, lambda j=j: row_at(j))


def oracle_logprob_row(model, context_ids: list[int]) -> torch.Tensor:
    """The oracle's raw logprobs [vocab] of the token after `context_ids` (SPEC §6: unprocessed)."""
    return torch.log_softmax(model.teacher_forced_logits(context_ids)[-1].float(), dim=-1)


def check_completion(name: str, model, prompt_ids: list[int], params, eos_token_ids,
                     oracle, candidate, dtype: torch.dtype = torch.float32,
                     controls_at: ControlsAt | None = None) -> int | None:
    """Compare one CompletionOutput with the oracle's under the SPEC rule.

    `params` are this sample's params (`SamplingParams.for_sample(index)`). Unseeded random
    samples are not comparable token-for-token and only their shape is checked. Returns the
    index of an allowed near-tie divergence, or None when the outputs agree entirely.
    """
    if not params.greedy and params.seed is None:
        return None
    decision_at = lru_cache(maxsize=None)(lambda j: oracle_decision(model, prompt_ids, oracle.token_ids, j, params,
                                                                     tuple(eos_token_ids), params.seed, controls_at))
    near_cut_at = None
    if truncates(params):
        near_cut_at = lambda j: near_cut(decision_at(j).processed, decision_at(j).noise, params, dtype)  # noqa: E731
    j = check_tokens_equal(name, oracle.token_ids, candidate.token_ids, lambda j: decision_at(j).scores, dtype,
                           near_cut_at)
    atol = LOGIT_ATOL[dtype]
    upto = len(oracle.token_ids) if j is None else j
    _check_logprob_lists(name, oracle.logprobs, candidate.logprobs, upto, params.logprobs, dtype,
                         lambda i: oracle_logprob_row(model, prompt_ids + oracle.token_ids[:i]))
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


def check_outputs_complete(requests: list[tuple[list[int] | None, object]], outputs) -> None:
    """Exactly one finished output per request, in request order, each with `n` completions
    indexed 0..n-1 (SPEC §2). `requests` holds (prompt_token_ids or None when unknown, params)."""
    if len(outputs) != len(requests):
        raise AssertionError(f"{len(outputs)} outputs for {len(requests)} requests (one per request, in order)")
    for i, ((prompt_ids, params), out) in enumerate(zip(requests, outputs)):
        name = f"request {i} (id {out.request_id!r})"
        if prompt_ids is not None and list(out.prompt_token_ids) != list(prompt_ids):
            raise AssertionError(f"{name}: prompt_token_ids {list(out.prompt_token_ids)[:12]}... are not the "
                                 f"request's {list(prompt_ids)[:12]}... (outputs out of order or mixed up?)")
        if not out.finished:
            raise AssertionError(f"{name}: returned unfinished")
        indices = [c.index for c in out.outputs]
        if indices != list(range(params.n)):
            raise AssertionError(f"{name}: completion indices {indices}, want 0..{params.n - 1} (n={params.n})")
        for c in out.outputs:
            if c.finish_reason not in ("stop", "length", "abort"):
                raise AssertionError(f"{name} sample {c.index}: finish_reason {c.finish_reason!r}")


def check_request_outputs(model, eos_token_ids, requests: list[tuple[list[int], object]],
                          oracle_outputs, candidate_outputs, dtype: torch.dtype = torch.float32,
                          controls_for: Callable[[list[int], Any], ControlsAt | None] | None = None) -> None:
    """Every request's every sample, plus prompt logprobs; `requests` holds (prompt_ids, params).
    Both lists must hold exactly one output per request, in order. Requests with bad_words or a
    constraint need `controls_for` (`oracle_controls(ref_engine)`), else a divergence onto a
    masked token could pass as a near-tie."""
    check_outputs_complete(requests, candidate_outputs)
    if len(oracle_outputs) != len(candidate_outputs):
        raise AssertionError(f"{len(candidate_outputs)} outputs, oracle has {len(oracle_outputs)}")
    for (prompt_ids, params), o, c in zip(requests, oracle_outputs, candidate_outputs):
        name = f"request {c.request_id}"
        if o.prompt_token_ids != c.prompt_token_ids:
            raise AssertionError(f"{name}: prompt_token_ids differ")
        if o.prompt != c.prompt:
            raise AssertionError(f"{name}: prompt {c.prompt!r} vs oracle {o.prompt!r}")
        if len(o.outputs) != len(c.outputs):
            raise AssertionError(f"{name}: {len(c.outputs)} samples, oracle has {len(o.outputs)}")
        _check_logprob_lists(f"{name} prompt", o.prompt_logprobs, c.prompt_logprobs,
                             len(prompt_ids) if o.prompt_logprobs is not None else 0, params.prompt_logprobs, dtype,
                             lambda i: oracle_logprob_row(model, prompt_ids[:i]))
        if controls_for is None and (params.bad_words or params.structured_outputs is not None):
            raise AssertionError(f"{name}: a request with bad_words or structured_outputs is compared "
                                 f"without the oracle's token controls (pass controls_for)")
        for i, (oc, cc) in enumerate(zip(o.outputs, c.outputs)):
            controls_at = controls_for(prompt_ids, params) if controls_for is not None else None
            check_completion(f"{name} sample {i}", model, prompt_ids, params.for_sample(i),
                             eos_token_ids, oc, cc, dtype, controls_at)
