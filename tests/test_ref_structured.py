"""Structured output in the oracle (SPEC §6 "Structured output", §4, §5 rule 0), end to end.

Every output that finished with "stop" (by EOS) must be a sentence of its constraint, checked by
an independent validator: `re.fullmatch`, choice membership, `jsonschema.validate`, `json.loads`.
The random tiny model rarely finishes long strings, so the constraints are bounded (choices,
short regexes, enums, booleans, small integers, short strings) and sampling is seeded with
temperature > 0 for variety.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from ref.sampling_params import SamplingParams, StructuredOutputsParams

SO = StructuredOutputsParams
EOS = 2
PROMPTS = ["Answer:", "The quick brown fox", "Once upon a time"]
SEEDS = range(6)

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "size": {"enum": ["s", "m", "l"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
        # xgrammar 0.2.9 drops maxLength when a pattern is given, so each bounds its own string
        "tag": {"type": "string", "maxLength": 2},
        "code": {"type": "string", "pattern": "^[a-c]{1,2}$"},
    },
    "required": ["ok", "size", "n"],
    "additionalProperties": False,
}


def _run(ref_llm, so: StructuredOutputsParams, max_tokens: int = 48, **kwargs):
    """One seeded sample per (prompt, seed): the completions."""
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=max_tokens, structured_outputs=so, **kwargs)
              for s in SEEDS]
    outs = ref_llm.generate([PROMPTS[s % len(PROMPTS)] for s in SEEDS], params)
    return [c for o in outs for c in o.outputs]


def _finished_by_eos(completions):
    done = [c for c in completions if c.finish_reason == "stop"]
    for c in done:
        assert c.token_ids[-1] == EOS and c.stop_reason is None, c
    return done


def _validate_all(completions, validate, min_finished=3):
    done = _finished_by_eos(completions)
    assert len(done) >= min_finished, [(c.text, c.finish_reason) for c in completions]
    for c in done:
        validate(c.text)
    return done


def test_regex(ref_llm):
    pattern = "[ab]{1,4}(-[0-9])?"
    done = _validate_all(_run(ref_llm, SO(regex=pattern)), lambda t: _check(re.fullmatch(pattern, t), t))
    assert len({c.text for c in done}) > 1


def test_choice(ref_llm):
    choices = ["yes", "no", "maybe so"]
    done = _validate_all(_run(ref_llm, SO(choice=choices)), lambda t: _check(t in choices, t))
    assert len({c.text for c in done}) > 1


def test_json_schema(ref_llm):
    so = SO(json=SCHEMA, disable_any_whitespace=True)
    _validate_all(_run(ref_llm, so), lambda t: jsonschema.validate(json.loads(t), SCHEMA))


def test_json_schema_as_text_with_whitespace(ref_llm):
    schema = {"type": "object", "properties": {"v": {"type": "boolean"}}, "required": ["v"]}
    so = SO(json=json.dumps(schema))
    _validate_all(_run(ref_llm, so), lambda t: jsonschema.validate(json.loads(t), schema), min_finished=1)


def test_json_object(ref_llm):
    completions = _run(ref_llm, SO(json_object=True, disable_any_whitespace=True))
    for c in _finished_by_eos(completions):
        assert isinstance(json.loads(c.text), dict), c.text
    for c in completions:  # unfinished ones are still a prefix of an object
        assert c.text.startswith("{"), c.text


def test_grammar(ref_llm):
    grammar = 'root ::= "(" item ("," item)? ")"\nitem ::= [0-9] | "x"'
    language = re.compile(r"\((?:[0-9]|x)(?:,(?:[0-9]|x))?\)")
    _validate_all(_run(ref_llm, SO(grammar=grammar)), lambda t: _check(language.fullmatch(t), t))


def test_each_of_n_samples_follows_the_constraint(ref_llm):
    choices = ["alpha", "beta", "gamma", "delta"]
    outs = ref_llm.generate(PROMPTS[:2], SamplingParams(n=3, temperature=1.2, seed=7, max_tokens=48,
                                                        structured_outputs=SO(choice=choices)))
    completions = [c for o in outs for c in o.outputs]
    assert len(completions) == 6
    done = _validate_all(completions, lambda t: _check(t in choices, t), min_finished=4)
    assert len({c.text for c in done}) > 1, "the samples share one grammar state"


def test_min_tokens_past_the_end_of_the_sentence_ends_by_rule_0(ref_llm):
    """The grammar's only next token is EOS, which min_tokens holds back: no token is left."""
    outs = _run(ref_llm, SO(choice=["ab", "ba"]), min_tokens=20)
    for c in outs:
        assert c.finish_reason == "stop" and c.stop_reason is None, c
        assert EOS not in c.token_ids and len(c.token_ids) < 20, c
        assert c.text in ("ab", "ba"), c.text


def test_ignore_eos_with_a_grammar_ends_by_rule_0(ref_llm):
    """EOS is then an ordinary token; after the grammar takes it, it allows nothing."""
    outs = _run(ref_llm, SO(regex="[ab]{1,3}"), ignore_eos=True)
    for c in outs:
        assert c.finish_reason == "stop" and c.stop_reason is None, c
        assert c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1], c
        assert re.fullmatch("[ab]{1,3}", c.text), c.text


def test_a_grammar_that_needs_more_than_max_tokens_stops_for_length(ref_llm):
    pattern = "[ab]{30}"
    for c in _run(ref_llm, SO(regex=pattern), max_tokens=3):
        assert c.finish_reason == "length" and len(c.token_ids) == 3, c
        assert not re.fullmatch(pattern, c.text) and re.fullmatch("[ab]*", c.text), c.text


def test_stop_strings_still_apply_to_a_constrained_output(ref_llm):
    completions = _run(ref_llm, SO(regex="a[bc]{6}"), stop=["c"])
    stopped = [c for c in completions if c.stop_reason == "c"]
    assert stopped, completions
    for c in stopped:  # cut before the first "c": what is left is a prefix of a sentence
        assert c.finish_reason == "stop" and re.fullmatch("ab*", c.text), c


BAD_CONSTRAINTS = [
    (SO(regex="(("), r"^structured_outputs\.regex cannot be compiled: "),
    (SO(grammar="root ::= undefined_rule"), r"^structured_outputs\.grammar cannot be compiled: "),
    (SO(json={"type": "nonsense"}), r"^structured_outputs\.json cannot be compiled: "),
]


def test_a_constraint_that_cannot_compile_is_rejected_before_any_state_changes(tiny_model_dir):
    from ref import LLM

    llm, clean = LLM(tiny_model_dir), LLM(tiny_model_dir)
    engine = llm.llm_engine
    for so, message in BAD_CONSTRAINTS:
        with pytest.raises(ValueError, match=message):
            engine.add_request("bad", PROMPTS[0], SamplingParams(structured_outputs=so))
        assert not engine.has_unfinished_requests() and engine.get_metrics().num_waiting == 0
        with pytest.raises(ValueError, match=message):  # one bad request among good ones: none queued
            llm.generate(PROMPTS, [SamplingParams(structured_outputs=SO(regex="a")),
                                   SamplingParams(structured_outputs=so), SamplingParams()])
        assert not engine.has_unfinished_requests() and engine.get_metrics().num_waiting == 0
    # Not even the engine's seed generator moved: an unseeded request samples as on a fresh engine.
    params = SamplingParams(temperature=1.0, max_tokens=6)
    assert llm.generate(PROMPTS[1], params)[0].outputs == clean.generate(PROMPTS[1], params)[0].outputs


def test_constraints_need_a_tokenizer(tiny_model_dir):
    from ref import LLM

    llm = LLM(tiny_model_dir, skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="^structured_outputs: .*tokenizer"):
        llm.generate({"prompt_token_ids": [5, 6]}, SamplingParams(structured_outputs=SO(regex="a")))


def _check(ok, text):
    assert ok, f"not a sentence of the constraint: {text!r}"
