"""SamplingParams: vLLM defaults, and every violation raises a ValueError naming its field."""

import math

import pytest
from hypothesis import given, strategies as st

from ref import SamplingParams

BAD = [
    ("n", 0), ("n", -1), ("n", 1.5),
    ("temperature", -0.1), ("temperature", math.inf), ("temperature", math.nan),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5),
    ("top_k", -2), ("top_k", 2.0),
    ("min_p", -0.01), ("min_p", 1.5),
    ("seed", -1), ("seed", 2**63),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0), ("frequency_penalty", -2.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("stop", [""]), ("stop", ""), ("stop_token_ids", [-1]),
    ("max_tokens", 0), ("max_tokens", -3),
    ("min_tokens", -1),
    ("logprobs", -1), ("prompt_logprobs", -2),
    ("ignore_eos", 1), ("skip_special_tokens", "yes"),
]


def test_defaults_are_vllms():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1, 1.0, 1.0, 0, 0.0, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.max_tokens, p.min_tokens) == ([], [], False, 16, 0)
    assert (p.logprobs, p.prompt_logprobs, p.skip_special_tokens, p.include_stop_str_in_output) == (
        None, None, True, False)


@pytest.mark.parametrize("field,value", BAD)
def test_bad_value_names_field(field, value):
    if field == "stop" and value == "":
        kwargs = {"stop": [""]}
    else:
        kwargs = {field: value}
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match=r"min_tokens must be <= max_tokens \(4\)"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_greedy_with_n_above_one():
    with pytest.raises(ValueError, match="n must be 1"):
        SamplingParams(temperature=0, n=2)


def test_greedy_normalises_truncation():
    p = SamplingParams(temperature=0, top_p=0.5, top_k=3, min_p=0.2)
    assert p.greedy and (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)


def test_stop_string_becomes_list():
    assert SamplingParams(stop="###").stop == ["###"]


@given(seed=st.integers(0, 2**63 - 1), n=st.integers(1, 8))
def test_for_sample_seeds(seed, n):
    p = SamplingParams(n=n, seed=seed)
    seeds = [p.for_sample(i).seed for i in range(n)]
    assert seeds[0] == seed
    assert len(set(seeds)) == n  # distinct samples get distinct seeds
    assert all(p.for_sample(i).n == n for i in range(n))
