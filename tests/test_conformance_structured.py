"""The structured tier (conformance/structured.py): its validators, its strategies, and the tier
itself on the oracle, on `fast`, and on an engine that ignores constraints.

The planted defects in `fast` that the tier must catch are in tests/test_conformance_catalogue.py.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conformance.runner import run_check
from conformance.contract import check_output_contract as check_contract
from conformance.contract import ended_by_rule0
from conformance.structured import ARITHMETIC, NESTED_LIST, TokenBytes, constraints, json_schemas, must_be_sentence, regexes, validate
from conformance.tiers import CHECKS, MAX_MODEL_LEN, Context, Profile
from ref.outputs import CompletionOutput, RequestOutput
from ref.sampling_params import SamplingParams, StructuredOutputsParams as S

PROFILE = Profile("structured-test", examples=6, max_requests=6, stateful_steps=10, families=False,
                  kernel_max_seq_len=64)
CHECK = next(c for c in CHECKS if c.tier == "structured")
EOS = (2,)


def quiet(examples: int):
    return settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def run_tier(factory, model_dir: str, examples: int = PROFILE.examples):
    profile = Profile(**{**PROFILE.__dict__, "examples": examples})
    ctx = Context(adapter=factory(model_dir, max_model_len=MAX_MODEL_LEN), model_dir=model_dir, profile=profile,
                  make_adapter=factory)
    return run_check(CHECK, ctx, seed=1234, shrink=False, replay="")


# ----------------------------------------------------------------------------- validators

@pytest.mark.parametrize("so,text", [
    (S(json={"type": "object", "properties": {"a": {"enum": ["x", 'y"']}}, "required": ["a"]}), '{"a": "y\\""}'),
    (S(json='{"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}, "required": ["n"]}'),
     '{ "n" :\n 3 }'),
    (S(json={"type": "object", "properties": {"s": {"type": "string", "maxLength": 2}}, "required": ["s"]}),
     '{"s": "\x0c!"}'),  # a raw control character: what xgrammar's JSON strings admit (strict=False)
    (S(json_object=True), '{"k": [1, {"x": null}]}'),
    (S(json_object=True, disable_any_whitespace=True), '{"k": [1, {"x": "a ,: b"}], "e": {}}'),  # compact
    (S(regex="(a|bc){1,2}[0-9]?"), "bca7"),
    (S(choice=["a", "ab", "b c"]), "b c"),
    (S(grammar=ARITHMETIC.ebnf), "(1+23)-4"),
    (S(grammar=NESTED_LIST.ebnf), "[x,[],[x,[x]]]"),
])
def test_validators_accept_sentences(so, text):
    assert validate(so, text) is None


@pytest.mark.parametrize("so,text,why", [
    (S(json={"type": "object", "properties": {"a": {"enum": ["x"]}}, "required": ["a"]}), '{"a": "z"}', "schema"),
    (S(json={"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
             "additionalProperties": False}), '{"a": true, "b": 1}', "schema"),
    (S(json={"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}), '{"a": true', "JSON"),
    (S(json={"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}), '{}', "schema"),
    (S(json_object=True), "[1]", "not an object"),
    (S(json_object=True, disable_any_whitespace=True), '{"k":1}', "no space after"),
    (S(json_object=True, disable_any_whitespace=True), '{"k": [1 ]}', "outside a string"),
    (S(json_object=True, disable_any_whitespace=True), '{"k":\n1}', "no space after"),
    (S(regex="(a|bc){1,2}"), "abca", "match"),  # three repetitions: a prefix matches, not the whole
    (S(regex="a"), "ab", "match"),
    (S(choice=["a", "ab"]), "abc", "one of"),
    (S(choice=["ab"]), "a", "one of"),  # a prefix of a choice is not a choice
    (S(grammar=ARITHMETIC.ebnf), "(1+2", "grammar"),
    (S(grammar=ARITHMETIC.ebnf), "123", "grammar"),  # at most two digits a number
    (S(grammar=NESTED_LIST.ebnf), "[x,]", "grammar"),
])
def test_validators_reject_planted_invalid_text(so, text, why):
    reason = validate(so, text)
    assert reason is not None and why in reason, reason


@quiet(40)
@given(constraints(), st.randoms(use_true_random=False))
def test_drawn_constraints_compile_and_their_random_sentences_validate(so, rnd):
    """Every drawn constraint compiles (ref/structured.py: the one both engines use); a random
    walk through its grammar that ends with EOS validates; the same text with a character
    appended that no sentence can end with does not (so the validators do reject)."""
    text = _random_sentence(so, rnd)
    if text is None:
        return
    assert validate(so, text) is None, (so, text)
    bad = text + ("x" if so.kind in ("json", "json_object") else "#")  # no drawn regex, choice or grammar spells '#'
    assert validate(so, bad) is not None, (so, bad)


_VOCAB: dict = {}


def _random_sentence(so, rnd: random.Random, max_tokens: int = 120):
    """A sentence of the constraint, by a random walk through xgrammar's mask (EOS taken half the
    times it is allowed), or None if the walk did not end."""
    import xgrammar

    from ref.models import tiny_checkpoint
    from ref.structured import compile_constraint, grammar_vocabulary

    if not _VOCAB:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tiny_checkpoint()))
        _VOCAB.update(bytes=TokenBytes.from_model_dir(str(tiny_checkpoint())),
                      compiler=xgrammar.GrammarCompiler(grammar_vocabulary(tok, 512, EOS)))
    matcher = xgrammar.GrammarMatcher(compile_constraint(_VOCAB["compiler"], so))
    bitmask = xgrammar.allocate_token_bitmask(1, 512)
    tokens = []
    for _ in range(max_tokens):
        matcher.fill_next_token_bitmask(bitmask)
        allowed = [t for t in range(512) if (int(bitmask[0, t // 32]) >> (t % 32)) & 1]
        token = EOS[0] if EOS[0] in allowed and rnd.random() < 0.5 else rnd.choice(allowed)
        assert matcher.accept_token(token)
        tokens.append(token)
        if token == EOS[0]:
            return _VOCAB["bytes"].sentence(CompletionOutput(0, "", tokens, None, None, "stop", None))
    return None


@quiet(30)
@given(json_schemas())
def test_drawn_schemas_are_small_closed_objects(schema):
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["type"] == "object" and 1 <= len(schema["properties"]) <= 3
    assert schema["required"] == list(schema["properties"]) and schema["additionalProperties"] is False
    json.dumps(schema)


@quiet(60)
@given(regexes())
def test_drawn_regexes_are_bounded(pattern):
    """No unbounded repetition: every sentence is short, so a random model can end one."""
    import re

    assert not re.search(r"[*+]", pattern), pattern
    re.compile(pattern)


def test_outputs_are_validated_as_the_bytes_the_grammar_took(tiny_model_dir):
    """xgrammar's JSON strings admit a surrogate code point's UTF-8 form (ED A6 AB), which the
    detokenizer shows as three U+FFFD: the text breaks maxLength 2, the bytes do not."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    so = S(json={"type": "object", "properties": {"d": {"type": "string", "maxLength": 2}}, "required": ["d"]},
           disable_any_whitespace=True)
    ids = [93, 4, 70, 4, 28, 223, 4, 63, 172, 102, 107, 4, 95, 2]  # {"d": "]\xed\xa6\xab"} EOS
    sample = CompletionOutput(0, tok.decode(ids, skip_special_tokens=True), ids, None, None, "stop", None)
    assert "too long" in validate(so, sample.text)
    sentence = TokenBytes.from_model_dir(tiny_model_dir).sentence(sample)
    assert sentence == '{"d": "]\ud9ab"}' and validate(so, sentence) is None
    for token in range(512):  # each token's bytes, where they are UTF-8, are what it decodes to
        raw = TokenBytes.from_model_dir(tiny_model_dir).table[token]
        if raw and all(b < 0x80 for b in raw):
            assert raw.decode() == tok.decode([token]), token
    with pytest.raises(AssertionError, match="not UTF-8"):  # a lone continuation byte: no grammar allows it
        TokenBytes.from_model_dir(tiny_model_dir).sentence(CompletionOutput(0, "", [98], None, None, "stop", None))


# ----------------------------------------------------------------------------- which outputs must validate

def _completion(ids, reason="stop", stop_reason=None, text=""):
    return CompletionOutput(0, text, list(ids), None, None, reason, stop_reason)


def test_which_samples_must_be_sentences():
    c = SamplingParams(structured_outputs=S(regex="a+"), max_tokens=8)
    assert must_be_sentence(c, _completion([67, 2]), EOS)  # EOS
    assert must_be_sentence(c, _completion([67]), EOS)  # rule 0, nothing else masks
    assert not must_be_sentence(c, _completion([67], "length"), EOS)
    assert not must_be_sentence(c, _completion([67, 86], stop_reason=86), EOS)  # a stop token
    assert not must_be_sentence(c, _completion([67], stop_reason="a"), EOS)  # a stop string
    masked = SamplingParams(structured_outputs=S(regex="a+"), allowed_token_ids=[67])
    assert not must_be_sentence(masked, _completion([67]), EOS)  # allowed_token_ids may have cut it short
    assert must_be_sentence(masked, _completion([67, 2]), EOS)  # but EOS means a whole sentence
    assert not must_be_sentence(SamplingParams(), _completion([67, 2]), EOS)  # unconstrained


def test_rule_0_is_told_from_a_stop_token():
    p = SamplingParams(structured_outputs=S(choice=["a"]), max_tokens=8)
    assert not ended_by_rule0(p, _completion([67, 2]), EOS)  # rule 1: EOS
    assert ended_by_rule0(p, _completion([67]), EOS)
    assert ended_by_rule0(p, _completion([]), EOS)
    held = SamplingParams(structured_outputs=S(choice=["a"]), ignore_eos=True)
    assert ended_by_rule0(held, _completion([67, 2]), EOS)  # EOS taken, not a stop: then nothing was left
    early = SamplingParams(structured_outputs=S(choice=["a"]), min_tokens=3, max_tokens=8)
    assert ended_by_rule0(early, _completion([67]), EOS)


def test_the_output_contract_knows_rule_0(tiny_model_dir):
    from conformance.contract import ModelRules

    rules = ModelRules.from_checkpoint(tiny_model_dir, MAX_MODEL_LEN)
    prompt = [5, 6, 7]
    out = lambda p, c: RequestOutput("0", None, prompt, None, [c], True)  # noqa: E731
    constrained = SamplingParams(structured_outputs=S(choice=["a"]), max_tokens=8, min_tokens=8)
    check_contract(prompt, constrained, out(constrained, _completion([67], text="a")), rules, "ok")
    check_contract(prompt, SamplingParams(allowed_token_ids=[3]), out(None, _completion([])), rules, "ok")
    with pytest.raises(AssertionError, match="rule 0"):  # nothing could have left no token
        check_contract(prompt, SamplingParams(), out(None, _completion([67], text="a")), rules, "bad")
    with pytest.raises(AssertionError, match="length limit"):  # max_tokens ends it first
        p = SamplingParams(structured_outputs=S(regex="a+"), max_tokens=1)
        check_contract(prompt, p, out(p, _completion([67], text="a")), rules, "bad")
    with pytest.raises(AssertionError, match="text"):
        check_contract(prompt, constrained, out(constrained, _completion([67], text="")), rules, "bad")


def test_structured_outputs_params_cross_to_the_engine_process_by_value():
    from conformance.isolation import _is_record

    assert _is_record(S(choice=["a"]))


# ----------------------------------------------------------------------------- the tier

def test_tier_passes_on_the_oracle_against_itself(tiny_model_dir):
    from conformance.adapters import RefAdapter

    result = run_tier(lambda d, **o: RefAdapter(d, **o), tiny_model_dir, examples=3)  # runs the oracle twice
    assert result.status == "passed", result.message[-3000:]
    assert result.coverage["total:validated"] >= 10, result.coverage


def test_tier_passes_on_fast(tiny_model_dir):
    from conformance.adapters import FastAdapter

    result = run_tier(lambda d, **o: FastAdapter(d, **o), tiny_model_dir)
    assert result.status == "passed", result.message[-3000:]
    for feature in ("preemption:structured", "prefix_hit:structured", "chunked:structured", "validated:json"):
        assert result.coverage.get(feature, 0) >= 1, (feature, result.coverage)


def test_an_engine_that_ignores_constraints_fails(tiny_model_dir):
    from tests.bad_adapters import ignores_constraints

    result = run_tier(ignores_constraints, tiny_model_dir)
    assert result.status == "failed"
    # Either the comparison (the oracle's decision, recomputed with its grammar mask, gives the
    # engine's unconstrained token no score) or the validator (an output EOS ended is no sentence).
    assert "scores inf below" in result.message or "does not match" in result.message, result.message[-3000:]


def test_a_model_without_tokenizer_is_not_applicable(tmp_path):
    from conformance.adapters import RefAdapter
    from ref.models import tiny_checkpoint

    bare = str(tiny_checkpoint(tokenizer=False, cache_dir=tmp_path))
    result = run_tier(lambda d, **o: RefAdapter(d, **o), bare, examples=1)
    assert result.status == "n/a" and "tokenizer" in result.message
