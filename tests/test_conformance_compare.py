"""The comparison rule of conformance/compare.py on hand-built cases: what it must accept (a
correct engine's float noise and near-tie swaps) and what it must reject (right values on the
wrong tokens, wrong ranks or text, a diverging token that is not one of the oracle's near-tied
candidates, missing or extra outputs)."""

from __future__ import annotations

import pytest
import torch

from conformance.compare import (LOGIT_ATOL, check_logprob_entry, check_outputs_complete, check_tokens_equal,
                                 near_tie_margin)
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
