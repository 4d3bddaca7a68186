"""conformance/contract.py: SPEC's output rules, checked independently of the code `fast` shares
with `ref` (stop rules, detokenization, output records).

1. hand-computed SPEC §5 examples over a character-level "tokenizer" (token i is the i-th
   letter), so every expected text is written down by hand, not computed by `ref`;
2. the contract's own decoder (the `tokenizers` library) against `ref.tokenizer`;
3. every output of both engines on random workloads satisfies the contract;
4. a bug planted in the shared stop rules passes the fast-vs-ref comparison but not the contract.
"""

from __future__ import annotations

import dataclasses
import string

import pytest
from hypothesis import given, settings, strategies as st

from conformance.contract import ModelRules, check_output_contract
from conformance.workloads import workloads
from ref.outputs import CompletionOutput, Logprob, RequestOutput
from ref.sampling_params import SamplingParams

LETTERS = string.ascii_lowercase  # token id i decodes to LETTERS[i]; "z" (25) is EOS
CHARS = ModelRules(vocab_size=26, eos_token_ids=(25,), max_model_len=12,
                   decode=lambda ids, skip: "".join(LETTERS[i] for i in ids if not (skip and i == 25)))


def ids(text: str) -> list[int]:
    return [LETTERS.index(ch) for ch in text]


def output(text_ids, text, finish, stop_reason=None, prompt=(0, 1), logprobs=None, cum=None):
    return RequestOutput("r", None, list(prompt), None,
                         [CompletionOutput(0, text, list(text_ids), cum, logprobs, finish, stop_reason)], True)


# (params, generated text as letters, the SPEC result: text, finish_reason, stop_reason)
SPEC_EXAMPLES = [
    (dict(max_tokens=3), "abc", ("abc", "length", None)),
    (dict(max_tokens=8), "abz", ("ab", "stop", None)),  # EOS: kept in token_ids, not in text
    (dict(max_tokens=8, include_stop_str_in_output=True), "abz", ("ab", "stop", None)),  # EOS is special
    (dict(max_tokens=8, include_stop_str_in_output=True, skip_special_tokens=False), "abz", ("abz", "stop", None)),
    (dict(max_tokens=8, skip_special_tokens=False), "abz", ("ab", "stop", None)),
    (dict(max_tokens=8, stop_token_ids=[3]), "abd", ("ab", "stop", 3)),
    (dict(max_tokens=8, stop_token_ids=[25]), "az", ("a", "stop", 25)),  # listed: reason is the id
    (dict(max_tokens=8, stop=["bc"]), "abc", ("a", "stop", "bc")),
    (dict(max_tokens=8, stop=["bc"], include_stop_str_in_output=True), "abc", ("abc", "stop", "bc")),
    (dict(max_tokens=8, stop=["cd", "bc"]), "abcd", None),  # "bc" appears first: stops at c
    (dict(max_tokens=8, stop=["cd", "bc"]), "abc", ("a", "stop", "bc")),
    (dict(max_tokens=8, stop=["bcd", "bc"]), "abc", ("a", "stop", "bc")),
    (dict(max_tokens=8, stop=["b", "ab"]), "ab", ("", "stop", "ab")),  # earliest position wins
    (dict(max_tokens=8, stop=["a", "ab"]), "a", ("", "stop", "a")),
    (dict(max_tokens=8, min_tokens=3, stop_token_ids=[1]), "acdb", ("acd", "stop", 1)),  # masked till 3
    (dict(max_tokens=8, min_tokens=2, stop=["a"]), "ab", ("", "stop", "a")),  # checked once 2 exist
    (dict(max_tokens=None), "abcdefghij", ("abcdefghij", "length", None)),  # 2 + 10 = max_model_len
]
FULL_PROMPT = list(range(12))  # exactly max_model_len tokens: SPEC §5.3, one token comes out


def test_a_prompt_of_max_model_len_yields_one_token():
    params = SamplingParams(temperature=0, max_tokens=5)
    check_output_contract(FULL_PROMPT, params, output(ids("a"), "a", "length", prompt=FULL_PROMPT), CHARS)
    with pytest.raises(AssertionError, match="passes"):
        check_output_contract(FULL_PROMPT, params, output(ids("ab"), "ab", "length", prompt=FULL_PROMPT), CHARS)


@pytest.mark.parametrize("kw,gen,want", SPEC_EXAMPLES)
def test_hand_computed_spec_examples(kw, gen, want):
    params = SamplingParams(temperature=0, **kw)
    if want is None:  # a sequence the rules would have stopped earlier
        with pytest.raises(AssertionError):
            check_output_contract([0, 1], params, output(ids(gen), gen, "length"), CHARS)
        return
    text, finish, reason = want
    check_output_contract([0, 1], params, output(ids(gen), text, finish, reason), CHARS)


def test_ignore_eos_runs_to_the_limit_and_keeps_eos_text():
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    # skip_special_tokens is True, and our char decoder drops "z" then, as a tokenizer drops EOS
    check_output_contract([0, 1], params, output(ids("abzab"), "abab", "length"), CHARS)
    with pytest.raises(AssertionError, match="stop token"):
        check_output_contract([0, 1], dataclasses.replace(params, ignore_eos=False),
                              output(ids("abzab"), "abab", "length"), CHARS)


# Each wrong output differs from the right one in one rule; the check must name it.
WRONG = [
    (dict(max_tokens=8, stop=["bc"]), "abc", ("abc", "stop", "bc"), "text"),  # not trimmed
    (dict(max_tokens=8, stop=["bc"]), "abc", ("a", "length", None), "stop string"),
    (dict(max_tokens=8, stop=["bc"]), "abcd", ("a", "stop", "bc"), "went on"),  # one token too many
    (dict(max_tokens=8, stop_token_ids=[3]), "abd", ("ab", "stop", None), "stop_reason"),
    (dict(max_tokens=8, stop_token_ids=[3]), "abdb", ("abdb", "length", None), "went on"),
    (dict(max_tokens=8, min_tokens=3, stop_token_ids=[1]), "ab", ("a", "stop", 1), "before min_tokens"),
    (dict(max_tokens=3), "ab", ("ab", "length", None), "length finish"),  # stopped early
    (dict(max_tokens=3), "abcd", ("abcd", "length", None), "passes max_tokens"),
    (dict(max_tokens=None), "abcdefghijk", ("abcdefghijk", "length", None), "max_model_len"),
    (dict(max_tokens=8, skip_special_tokens=False), "abz", ("abz", "stop", None), "text"),  # EOS left in
    (dict(max_tokens=8, stop=["cd", "bc"]), "abc", ("a", "stop", "cd"), "stop string"),
]


@pytest.mark.parametrize("kw,gen,got,match", WRONG)
def test_wrong_outputs_are_named(kw, gen, got, match):
    text, finish, reason = got
    with pytest.raises(AssertionError, match=match):
        check_output_contract([0, 1], SamplingParams(temperature=0, **kw), output(ids(gen), text, finish, reason), CHARS)


def _lp(entries):
    return {t: Logprob(v, r, LETTERS[t]) for t, (v, r) in entries.items()}


def test_logprob_entries():
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=2)
    good = _lp({0: (-0.5, 1), 1: (-1.5, 2)})
    check_output_contract([0, 1], params, output([0], "a", "length", logprobs=[good], cum=-0.5), CHARS)
    below = _lp({4: (-3.0, 7), 0: (-0.5, 1), 1: (-1.5, 2)})  # chosen token below the top-2
    check_output_contract([0, 1], params, output([4], "e", "length", logprobs=[below], cum=-3.0), CHARS)
    bad = {
        "rank": _lp({0: (-0.5, 2), 1: (-1.5, 1)}),  # right values, swapped ranks
        "missing": _lp({1: (-0.5, 1), 2: (-1.5, 2)}),  # the chosen token is not listed
        "entries": _lp({0: (-0.5, 1)}),  # only one of the top-2
    }
    for match, entry in bad.items():
        with pytest.raises(AssertionError, match=match):
            check_output_contract([0, 1], params, output([0], "a", "length", logprobs=[entry], cum=-0.5), CHARS)
    wrong_text = {0: Logprob(-0.5, 1, "b"), 1: Logprob(-1.5, 2, "b")}
    with pytest.raises(AssertionError, match="decoded_token"):
        check_output_contract([0, 1], params, output([0], "a", "length", logprobs=[wrong_text], cum=-0.5), CHARS)
    with pytest.raises(AssertionError, match="cumulative_logprob"):
        check_output_contract([0, 1], params, output([0], "a", "length", logprobs=[good], cum=-0.1), CHARS)


# ---------------------------------------------------------------- the real tokenizer
@given(token_ids=st.lists(st.integers(0, 511), max_size=40), skip=st.booleans())
@settings(max_examples=50)
def test_independent_decoder_agrees_with_ref_codec(tiny_model_dir, token_ids, skip):
    from ref.tokenizer import TextCodec, load_tokenizer

    codec = _codec(tiny_model_dir, TextCodec, load_tokenizer)
    rules = _rules(tiny_model_dir)
    assert rules.decode(token_ids, skip) == codec.decode(token_ids, skip) if token_ids else True
    for t in token_ids[:5]:
        assert rules.decode([t], False) == codec.token_text(t)


_CACHE: dict = {}


def _codec(model_dir, TextCodec, load_tokenizer):
    if "codec" not in _CACHE:
        _CACHE["codec"] = TextCodec(load_tokenizer(model_dir))
    return _CACHE["codec"]


def _rules(model_dir, max_model_len=128):
    key = ("rules", max_model_len)
    if key not in _CACHE:
        _CACHE[key] = ModelRules.from_checkpoint(model_dir, max_model_len)
    return _CACHE[key]


def _engines(model_dir):
    if "engines" not in _CACHE:
        import fast
        import ref

        _CACHE["engines"] = (ref.LLM(model_dir, max_model_len=128, max_batch=64),
                             fast.LLM(model_dir, max_model_len=128, num_kv_blocks=24, block_size=8,
                                      max_num_seqs=4, max_num_batched_tokens=32))
    return _CACHE["engines"]


@given(w=workloads(max_requests=6, max_prompt_len=60, max_tokens=12))
@settings(max_examples=10)
def test_both_engines_satisfy_the_contract(tiny_model_dir, w):
    rules = _rules(tiny_model_dir)
    ref_llm, fast_llm = _engines(tiny_model_dir)
    for llm, name in ((ref_llm, "ref"), (fast_llm, "fast")):
        kw = {} if name == "ref" else {"use_tqdm": False}
        outs = llm.generate(w.prompts, w.params, **kw)
        assert len(outs) == len(w.prompts)
        for i, (prompt, params, out) in enumerate(zip(w.prompts, w.params, outs)):
            check_output_contract(prompt["prompt_token_ids"], params, out, rules, f"{name} request {i}")


def test_planted_bug_in_the_oracles_stop_rules_is_caught_by_the_contract_and_by_fast(tiny_model_dir, monkeypatch):
    """An off-by-one in the oracle's stop-string search (the text keeps the stop string's first
    character). fast no longer imports it (its stop checker is incremental, fast/core/detokenizer.py),
    so comparing fast with ref catches it, and the contract catches it in ref's outputs alone."""
    import ref.sequence as seq
    from conformance.compare import check_request_outputs

    right = seq.find_stop_string

    def off_by_one(text, stops):
        hit = right(text, stops)
        return None if hit is None else (hit[0] + 1, hit[1])

    monkeypatch.setattr(seq, "find_stop_string", off_by_one)
    rules = _rules(tiny_model_dir)
    ref_llm, fast_llm = _engines(tiny_model_dir)
    prompts = [{"prompt_token_ids": list(range(40 + i, 60 + i))} for i in range(4)]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=["e", "a", " "])] * len(prompts)
    expected, got = ref_llm.generate(prompts, params), fast_llm.generate(prompts, params, use_tqdm=False)
    assert any(c.stop_reason in ("e", "a", " ") for o in got for c in o.outputs)  # the rule was reached
    for i, (p, sp, o) in enumerate(zip(prompts, params, got)):
        check_output_contract(p["prompt_token_ids"], sp, o, rules, f"fast request {i}")
    e = ref_llm.llm_engine
    with pytest.raises(AssertionError, match="text differs"):
        check_request_outputs(e.model, e.model_config.eos_token_ids,
                              [(p["prompt_token_ids"], sp) for p, sp in zip(prompts, params)], expected, got)
    with pytest.raises(AssertionError, match="text"):
        for i, (p, sp, o) in enumerate(zip(prompts, params, expected)):
            check_output_contract(p["prompt_token_ids"], sp, o, rules, f"ref request {i}")
