"""The comparison rule of conformance/compare.py on hand-built cases: what it must accept (a
correct engine's float noise and near-tie swaps) and what it must reject (right values on the
wrong tokens, wrong ranks or text, a diverging token that is not one of the oracle's near-tied
candidates, missing or extra outputs)."""

from __future__ import annotations

import pytest
import torch

from conformance.compare import (LOGIT_ATOL, assert_close, check_logprob_entry, check_outputs_complete, check_tokens_equal,
                                 near_cut, near_tie_margin)
from ref.outputs import CompletionOutput, Logprob, RequestOutput
from ref.sampling_params import SamplingParams

F32 = torch.float32
ATOL = LOGIT_ATOL[F32]
MARGIN = near_tie_margin(F32)


def row(values: dict[int, float], vocab: int = 8, rest: float = -9.0) -> torch.Tensor:
    r = torch.full((vocab,), rest)
    for t, v in values.items():
        r[t] = v
    return r


def entry(r: torch.Tensor, token: int, top: list[int], text=lambda t: f"<{t}>") -> dict[int, Logprob]:
    rank = lambda t: 1 + int((r > r[t]).sum())  # noqa: E731
    return {t: Logprob(float(r[t]), rank(t), text(t)) for t in [token, *top]}


ROW = row({0: -0.5, 1: -1.0, 2: -2.0, 3: -3.0})


def test_identical_entries_pass():
    e = entry(ROW, 3, [0, 1, 2])
    check_logprob_entry("x", e, dict(e), 3, F32, lambda: ROW)


def test_float_noise_within_atol_passes():
    noisy = {t: Logprob(lp.logprob + ATOL / 2, lp.rank, lp.decoded_token) for t, lp in entry(ROW, 3, [0, 1]).items()}
    check_logprob_entry("x", entry(ROW, 3, [0, 1]), noisy, 2, F32, lambda: ROW)


def test_right_values_on_wrong_tokens_fail():
    e = entry(ROW, 3, [0, 1, 2])
    swapped = {3: e[3], 1: Logprob(e[0].logprob, 1, "<1>"), 0: Logprob(e[1].logprob, 2, "<0>"), 2: e[2]}
    with pytest.raises(AssertionError, match="token 1 logprob -0.5 vs oracle -1"):
        check_logprob_entry("x", e, swapped, 3, F32, lambda: ROW)


def test_wrong_top_token_fails_even_with_right_values():
    e = entry(ROW, 3, [0, 1])
    other = {3: e[3], 0: e[0], 5: Logprob(e[1].logprob, 2, "<5>")}  # token 5 is far below token 1
    with pytest.raises(AssertionError, match="token 5 carries logprob"):
        check_logprob_entry("x", e, other, 2, F32, lambda: ROW)


def test_wrong_rank_fails():
    e = entry(ROW, 3, [0])
    bad = {t: Logprob(lp.logprob, lp.rank - 1, lp.decoded_token) for t, lp in e.items()}  # 0-based ranks
    with pytest.raises(AssertionError, match="rank"):
        check_logprob_entry("x", e, bad, 1, F32, lambda: ROW)


def test_wrong_decoded_text_fails():
    e = entry(ROW, 3, [0, 1])
    bad = entry(ROW, 3, [0, 1], text=lambda t: f"<{t + 1}>")
    with pytest.raises(AssertionError, match="decoded_token"):
        check_logprob_entry("x", e, bad, 2, F32, lambda: ROW)


def test_near_tied_tokens_may_swap_places_and_ranks():
    tied = row({0: -0.5, 1: -0.5 - MARGIN / 4, 2: -2.0})
    oracle = entry(tied, 2, [0, 1])
    # A correct engine whose noise put token 1 first: ranks swapped, each value still its own.
    cand = {2: oracle[2], 1: Logprob(float(tied[1]) + ATOL / 2, 1, "<1>"),
            0: Logprob(float(tied[0]) - ATOL / 2, 2, "<0>")}
    check_logprob_entry("x", oracle, cand, 2, F32, lambda: tied)


def test_near_tie_at_the_kth_place_may_change_the_set():
    tied = row({0: -0.5, 1: -1.0, 2: -1.0 - MARGIN / 4})
    oracle = entry(tied, 0, [0, 1])  # top-2 = {0, 1}; 2 is near-tied with 1
    cand = {0: oracle[0], 2: Logprob(float(tied[2]), 2, "<2>")}
    check_logprob_entry("x", oracle, cand, 2, F32, lambda: tied)


def test_a_clear_top_token_may_not_drop_out():
    oracle = entry(ROW, 0, [0, 1])
    cand = {0: oracle[0], 2: Logprob(float(ROW[2]), 2, "<2>")}  # token 2 is 1.0 below token 1
    with pytest.raises(AssertionError):
        check_logprob_entry("x", oracle, cand, 2, F32, lambda: ROW)


def test_sampled_token_near_tied_with_the_kth_may_leave_the_top_k():
    """The sampled token 2 is near-tied with token 1, the 2nd: the oracle lists it in its top-2
    (2 entries), a correct engine may put token 1 there instead (3 entries)."""
    tied = row({0: -0.5, 2: -1.0, 1: -1.0 - MARGIN / 4})
    oracle = entry(tied, 2, [0, 2])
    cand = {2: Logprob(float(tied[2]), 3, "<2>"), 0: oracle[0], 1: Logprob(float(tied[1]), 2, "<1>")}
    check_logprob_entry("x", oracle, cand, 2, F32, lambda: tied)  # one entry more
    check_logprob_entry("x", cand, oracle, 2, F32, lambda: tied)  # one entry fewer


def test_entry_count_must_match_where_the_sampled_token_is_clear_of_the_kth():
    oracle = entry(ROW, 3, [0, 1])  # sampled token 3 is far below the top-2: 3 entries
    in_top = {3: Logprob(float(ROW[3]), 2, "<3>"), 0: oracle[0]}  # claims token 3 is in the top-2
    with pytest.raises(AssertionError):
        check_logprob_entry("x", oracle, in_top, 2, F32, lambda: ROW)
    top_in = entry(ROW, 0, [0, 1])  # sampled token 0 is the best: 2 entries
    left_out = {0: top_in[0], 1: top_in[1], 2: Logprob(float(ROW[2]), 3, "<2>")}  # top-3 listed
    with pytest.raises(AssertionError, match="left out of the top-2"):
        check_logprob_entry("x", top_in, left_out, 2, F32, lambda: ROW)
    with pytest.raises(AssertionError, match="entries for the sampled/actual token and a top-2"):
        check_logprob_entry("x", top_in, {**left_out, 3: Logprob(float(ROW[3]), 4, "<3>")}, 2, F32, lambda: ROW)


def test_token_divergence_must_be_one_of_the_near_tied_candidates():
    scores = torch.tensor([1.0, 1.0 - MARGIN / 2, 0.2, 1.0 - 3 * MARGIN])
    assert check_tokens_equal("x", [0, 5], [1, 7], lambda j: scores, F32) == 0  # 1 is near-tied with 0
    with pytest.raises(AssertionError, match="near-tie margin"):
        check_tokens_equal("x", [0, 5], [2, 7], lambda j: scores, F32)  # a near-tie exists, but not with 2
    with pytest.raises(AssertionError, match="near-tie margin"):
        check_tokens_equal("x", [0, 5], [3, 7], lambda j: scores, F32)  # just outside the margin


def _out(i: int, prompt_ids: list[int], n: int = 1) -> RequestOutput:
    comps = [CompletionOutput(k, "", [1], None, None, "length", None) for k in range(n)]
    return RequestOutput(str(i), None, prompt_ids, None, comps, True)


def test_outputs_complete_in_order():
    reqs = [([1, 2], SamplingParams()), ([3], SamplingParams(n=2, seed=1))]
    check_outputs_complete(reqs, [_out(0, [1, 2]), _out(1, [3], 2)])
    with pytest.raises(AssertionError, match="1 outputs for 2 requests"):
        check_outputs_complete(reqs, [_out(0, [1, 2])])
    with pytest.raises(AssertionError, match="3 outputs for 2 requests"):
        check_outputs_complete(reqs, [_out(0, [1, 2]), _out(1, [3], 2), _out(2, [3])])
    with pytest.raises(AssertionError, match="prompt_token_ids"):
        check_outputs_complete(reqs, [_out(1, [3], 2), _out(0, [1, 2])])
    with pytest.raises(AssertionError, match="completion indices"):
        check_outputs_complete(reqs, [_out(0, [1, 2]), _out(1, [3], 1)])


# ----------------------------------------------------------------------------- near-cut clause
# Half precision: logits of two correct engines differ by up to LOGIT_ATOL[bf16] = 0.1, so a token
# within that of a top-k / top-p / min-p cut may be kept by one engine and cut by the other.

BF16 = torch.bfloat16
BF16_MARGIN = near_tie_margin(BF16)


def _oracle_scores(processed: torch.Tensor, noise: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The oracle's decision scores (compare.oracle_decision's formula, on given logits and noise)."""
    from ref.sampler import truncate

    return torch.log(torch.softmax(truncate(processed, params), -1) / noise) * params.temperature


def _race(processed, noise, params, keep) -> int:
    """The token an engine that keeps exactly `keep` samples: argmax of probs / noise."""
    z = processed / params.temperature
    z = torch.where(torch.tensor([t in keep for t in range(len(z))]), z, torch.tensor(float("-inf")))
    return int(torch.argmax(torch.softmax(z, -1) / noise))


def _check(processed, noise, params, oracle_token, candidate_token, dtype=BF16):
    return check_tokens_equal("req", [oracle_token, 9], [candidate_token, 9],
                              lambda j: _oracle_scores(processed, noise, params), dtype,
                              lambda j: near_cut(processed, noise, params, dtype))


# Token 2 is the 3rd largest logit, token 3 is 0.05 below it (within bf16's tolerance): top-k=3
# keeps {0, 1, 2} on the oracle and may keep {0, 1, 3} on a correct bf16 engine.
TOPK_LOGITS = torch.tensor([3.0, 2.0, 1.0, 0.95, -1.0, -2.0, -2.0, -3.0])
TOPK = SamplingParams(temperature=1.0, top_k=3, seed=1)
NOISE = torch.tensor([1.0, 1.0, 0.01, 0.01, 1.0, 1.0, 1.0, 1.0])  # tokens 2 and 3 win any race they enter


def test_near_cut_accepts_a_flip_at_the_top_k_cut():
    oracle = _race(TOPK_LOGITS, NOISE, TOPK, {0, 1, 2})
    candidate = _race(TOPK_LOGITS, NOISE, TOPK, {0, 1, 3})
    assert (oracle, candidate) == (2, 3)
    assert _oracle_scores(TOPK_LOGITS, NOISE, TOPK)[3] == float("-inf")  # the near-tie rule alone rejects it
    assert 3 in near_cut(TOPK_LOGITS, NOISE, TOPK, BF16).near
    assert _check(TOPK_LOGITS, NOISE, TOPK, oracle, candidate) == 0


def test_near_cut_rejects_a_token_far_below_the_top_k_cut():
    far = TOPK_LOGITS.clone()
    far[3] = 0.5  # 0.5 below the k-th: no bf16 engine keeps it
    assert near_cut(far, NOISE, TOPK, BF16).near == frozenset()
    with pytest.raises(AssertionError, match="no token is near a top-k/top-p/min-p cut"):
        _check(far, NOISE, TOPK, 2, 3)
    # ... and in fp32 the tolerance is 1e-4: 0.05 below the cut is far
    with pytest.raises(AssertionError, match="near-tie margin"):
        _check(TOPK_LOGITS, NOISE, TOPK, 2, 3, dtype=F32)


def test_near_cut_rejects_a_candidate_that_could_not_win_the_race():
    """The oracle's token 2 is near the cut (a bf16 engine may cut it), but then token 0 wins the
    race among the surely kept ones; token 1 is 1.0 behind it, far beyond the near-tie margin."""
    cut = near_cut(TOPK_LOGITS, NOISE, TOPK, BF16)
    assert 2 in cut.near and 1 not in cut.allowed and 0 in cut.allowed
    assert _check(TOPK_LOGITS, NOISE, TOPK, 2, 0) == 0  # token 2 cut: token 0 wins
    with pytest.raises(AssertionError, match="near a top-k/top-p/min-p cut: \\[2, 3\\]"):
        _check(TOPK_LOGITS, NOISE, TOPK, 2, 1)


def test_near_cut_at_the_top_p_boundary():
    """probs 0.5, 0.3, 0.15, ...: with top_p = 0.8 the mass before token 2 is exactly the cut."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.03, 0.01, 0.005, 0.003, 0.002])
    logits, noise = torch.log(probs), torch.tensor([1.0, 1.0, 0.001, 1.0, 1.0, 1.0, 1.0, 1.0])
    at_cut = SamplingParams(temperature=1.0, top_p=0.8, seed=1)
    oracle = _race(logits, noise, at_cut, {0, 1})  # the oracle cuts token 2 (mass before it 0.8 >= 0.8)
    assert (oracle, _race(logits, noise, at_cut, {0, 1, 2})) == (0, 2)
    assert _check(logits, noise, at_cut, oracle, 2) == 0
    far = SamplingParams(temperature=1.0, top_p=0.6, seed=1)  # mass before token 2 is 0.8, far past 0.6
    with pytest.raises(AssertionError, match="near-tie margin"):
        _check(logits, noise, far, _race(logits, noise, far, {0, 1}), 2)


def test_near_cut_at_the_min_p_threshold():
    """min_p = 0.1: token 2's probability is 0.098 x the top one's (kept by a bf16 engine that
    rounds it up), token 3's 0.05 x (cut by every engine)."""
    logits = torch.log(torch.tensor([1.0, 0.5, 0.098, 0.05, 0.01, 0.01, 0.01, 0.01]))
    noise = torch.tensor([1.0, 1.0, 0.001, 0.0001, 1.0, 1.0, 1.0, 1.0])
    params = SamplingParams(temperature=1.0, min_p=0.1, seed=1)
    assert _check(logits, noise, params, _race(logits, noise, params, {0, 1}), 2) == 0
    with pytest.raises(AssertionError, match="near a top-k/top-p/min-p cut: \\[2\\]"):
        _check(logits, noise, params, _race(logits, noise, params, {0, 1}), 3)


def test_greedy_requests_never_use_the_near_cut_clause(monkeypatch):
    """A greedy divergence beyond the near-tie margin fails, whatever its top_k asked: the clause
    is never consulted (greedy does not truncate)."""
    import conformance.compare as compare

    class Model:  # every position's logits are TOPK_LOGITS
        def teacher_forced_logits(self, ids):
            return TOPK_LOGITS.expand(len(ids), -1).clone()

    def must_not_run(*args, **kwargs):
        raise AssertionError("the near-cut clause was consulted for a greedy request")

    monkeypatch.setattr(compare, "near_cut", must_not_run)
    greedy = SamplingParams(temperature=0.0, top_k=3, max_tokens=2)
    assert not compare.truncates(greedy)
    oracle = CompletionOutput(0, "", [0, 0], None, None, "length", None)
    candidate = CompletionOutput(0, "", [3, 0], None, None, "length", None)  # token 3: 2.05 below the best
    with pytest.raises(AssertionError, match="beyond the near-tie margin"):
        compare.check_completion("req", Model(), [5], greedy, (), oracle, candidate, BF16)


def test_check_completion_wires_the_clause_for_seeded_truncating_requests():
    """Through check_completion, with the oracle's own noise for the seed: a divergence that a
    near-cut flip explains passes, and the same divergence with the token far from the cut fails."""
    from ref.sampler import exponential_noise

    params = SamplingParams(temperature=1.0, top_k=3, seed=11, max_tokens=1)
    noise = exponential_noise(torch.Generator().manual_seed(11), 8)

    class Model:
        def __init__(self, row):
            self.row = row

        def teacher_forced_logits(self, ids):
            return self.row.expand(len(ids), -1).clone()

    # The two tokens with the smallest noise sit near the top-k cut (the 3rd largest and 0.05
    # below it), the two with the largest above it: each engine's near-cut token wins its race.
    order = torch.argsort(noise).tolist()
    a, b, x, y = order[0], order[1], order[-1], order[-2]
    row = torch.full((8,), -2.0)
    row[x], row[y], row[a], row[b] = 1.2, 1.1, 1.0, 0.95
    o, c = (_race(row, noise, params, keep) for keep in ({x, y, a}, {x, y, b}))
    assert (o, c) == (a, b), "the noise draw does not make the near-cut tokens win"
    out = lambda t: CompletionOutput(0, "", [t], None, None, "length", None)  # noqa: E731
    assert compare_completion(Model(row), params, out(o), out(c), BF16) is not None
    with pytest.raises(AssertionError):
        compare_completion(Model(row), params, out(o), out(c), F32)  # fp32's tolerance: not near


def compare_completion(model, params, oracle, candidate, dtype):
    from conformance.compare import check_completion

    return check_completion("req", model, [5], params, (), oracle, candidate, dtype)


@pytest.mark.parametrize("actual,expected,ok", [
    ([float("-inf"), 1.0], [float("-inf"), 1.0 + 1e-7], True),  # a masked logprob on both sides
    ([float("nan")], [float("nan")], False),  # NaN is never close, not even to NaN
    ([float("nan")], [1.0], False),
    ([1.0], [float("nan")], False),
    ([float("-inf")], [0.0], False),
    ([float("inf")], [float("-inf")], False),
])
def test_assert_close_on_non_finite_values(actual, expected, ok):
    check = lambda: assert_close("x", torch.tensor(actual), torch.tensor(expected), 1e-3)  # noqa: E731
    if ok:
        check()
    else:
        with pytest.raises(AssertionError, match="x: 1/"):
            check()
