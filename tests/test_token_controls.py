"""Token controls (SPEC §3 "Token controls and constraints", §4, §5 rule 0, §6 step 1) in the oracle.

Each layer against a definition written here independently of it: `SamplingParams` validation
and cloning; `ref.inputs` (vocab bounds, truncate_prompt, bad_words_token_ids against the
tokenizer itself); the sampler's masks on random logits (Hypothesis) against a per-token
definition; and the reference LLM end to end.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import event, given, note, strategies as st

from ref.inputs import (
    MAX_BAD_WORD_CHARS, MAX_BAD_WORDS, MAX_STRUCTURED_CHARS, ProcessedPrompt, RequestLimits, bad_words_token_ids,
    truncate_prompt, validate_request,
)
from ref.sampler import TokenControls, process_logits, sample
from ref.sampling_params import GuidedDecodingParams, SamplingParams, StructuredOutputsParams
from ref.tokenizer import TextCodec, load_tokenizer

VOCAB = 512
EOS = 2
SO = StructuredOutputsParams


# ---------------------------------------------------------------- SamplingParams
@pytest.mark.parametrize("kwargs, field", [
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
    ({"allowed_token_ids": [1.5]}, "allowed_token_ids"),
    ({"allowed_token_ids": [True]}, "allowed_token_ids"),
    ({"allowed_token_ids": 3}, "allowed_token_ids"),
    ({"bad_words": [""]}, "bad_words"),
    ({"bad_words": ["  "]}, "bad_words"),
    ({"bad_words": [3]}, "bad_words"),
    ({"bad_words": "word"}, "bad_words"),
    ({"logit_bias": [1]}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"logit_bias": {5: 100.5}}, r"logit_bias\[5\]"),
    ({"logit_bias": {5: float("nan")}}, r"logit_bias\[5\]"),
    ({"logit_bias": {5: "x"}}, r"logit_bias\[5\]"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": 2.0}, "truncate_prompt_tokens"),
    ({"structured_outputs": {"regex": "a"}}, "structured_outputs"),
    ({"guided_decoding": SO(regex="a"), "structured_outputs": SO(regex="b")}, "guided_decoding"),
])
def test_bad_token_controls_name_their_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    ({}, "structured_outputs"),
    ({"regex": "a", "choice": ["a"]}, "structured_outputs"),
    ({"json": "{not json"}, r"structured_outputs\.json"),
    ({"json": 5}, r"structured_outputs\.json"),
    ({"regex": ""}, r"structured_outputs\.regex"),
    ({"choice": []}, r"structured_outputs\.choice"),
    ({"choice": ["a", ""]}, r"structured_outputs\.choice"),
    ({"grammar": 7}, r"structured_outputs\.grammar"),
    ({"json_object": True, "disable_any_whitespace": 1}, r"structured_outputs\.disable_any_whitespace"),
])
def test_bad_structured_outputs_name_their_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SO(**kwargs)


def test_good_token_controls_are_kept():
    p = SamplingParams(allowed_token_ids=(3, 4), bad_words=["x"], logit_bias={5: 100, 6: -100},
                       truncate_prompt_tokens=1, structured_outputs=SO(choice=("a", "b")))
    assert p.allowed_token_ids == [3, 4] and p.bad_words == ["x"]
    assert p.logit_bias == {5: 100.0, 6: -100.0} and p.truncate_prompt_tokens == 1
    assert p.structured_outputs.choice == ["a", "b"] and p.structured_outputs.kind == "choice"


def test_guided_decoding_is_the_older_name_of_structured_outputs():
    assert GuidedDecodingParams is StructuredOutputsParams
    p = SamplingParams(guided_decoding=GuidedDecodingParams(regex="[ab]+"))
    assert p.structured_outputs == SO(regex="[ab]+") and p.guided_decoding is None
    assert p.clone().structured_outputs == SO(regex="[ab]+")


def test_clone_is_independent_of_the_callers_containers():
    schema = {"type": "object", "properties": {"a": {"enum": [1, 2]}}}
    allowed, bias, words, choice = [3, 4], {5: 1.0}, ["x"], ["a", "b"]
    p = SamplingParams(allowed_token_ids=allowed, logit_bias=bias, bad_words=words,
                       structured_outputs=SO(json=schema))
    q = SamplingParams(structured_outputs=SO(choice=choice))
    pc, qc = p.clone(), q.clone()
    allowed.append(6)
    bias[7] = 2.0
    words.append("y")
    choice.append("c")
    schema["properties"]["a"]["enum"].append(3)
    p.allowed_token_ids.append(8)
    p.logit_bias[9] = 3.0
    p.structured_outputs.json["properties"]["b"] = {}
    q.structured_outputs.choice.append("d")
    assert pc.allowed_token_ids == [3, 4] and pc.logit_bias == {5: 1.0} and pc.bad_words == ["x"]
    assert pc.structured_outputs.json == {"type": "object", "properties": {"a": {"enum": [1, 2]}}}
    assert qc.structured_outputs.choice == ["a", "b"]


# ---------------------------------------------------------------- ref.inputs
LIMITS = RequestLimits(vocab_size=VOCAB, max_model_len=64, max_logprobs=20)
PROMPT = ProcessedPrompt("hi", [5, 6, 7])


def _validate(has_tokenizer=True, **kwargs):
    validate_request(PROMPT, SamplingParams(**kwargs), LIMITS, has_tokenizer)


@pytest.mark.parametrize("kwargs, message", [
    ({"allowed_token_ids": [3, VOCAB]}, rf"^allowed_token_ids must be in \[0, {VOCAB}\).*got {VOCAB}"),
    ({"logit_bias": {VOCAB + 7: 1.0}}, rf"^logit_bias keys must be in \[0, {VOCAB}\).*got {VOCAB + 7}"),
    ({"bad_words": ["w"] * (MAX_BAD_WORDS + 1)}, f"^bad_words must have at most {MAX_BAD_WORDS}"),
    ({"bad_words": ["w" * (MAX_BAD_WORD_CHARS + 1)]}, f"^bad_words must be at most {MAX_BAD_WORD_CHARS}"),
    ({"structured_outputs": SO(regex="a" * (MAX_STRUCTURED_CHARS + 1))},
     rf"^structured_outputs\.regex must be at most {MAX_STRUCTURED_CHARS}"),
    ({"structured_outputs": SO(choice=["a" * 40_000, "b" * 30_000])},
     rf"^structured_outputs\.choice must be at most {MAX_STRUCTURED_CHARS}"),
    ({"structured_outputs": SO(json={"enum": ["a" * MAX_STRUCTURED_CHARS]})},
     rf"^structured_outputs\.json must be at most {MAX_STRUCTURED_CHARS}"),
])
def test_validate_request_bounds(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _validate(**kwargs)


def test_validate_request_accepts_what_is_just_inside_the_bounds():
    _validate(allowed_token_ids=[0, VOCAB - 1], logit_bias={VOCAB - 1: -100.0},
              bad_words=["w" * MAX_BAD_WORD_CHARS] * MAX_BAD_WORDS,
              structured_outputs=SO(grammar="r" * MAX_STRUCTURED_CHARS))  # compiling is the engine's


@pytest.mark.parametrize("kwargs, field", [
    ({"bad_words": ["x"]}, "bad_words"),
    ({"structured_outputs": SO(regex="a")}, "structured_outputs"),
])
def test_text_controls_need_a_tokenizer(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: .*tokenizer"):
        _validate(has_tokenizer=False, **kwargs)
    _validate(has_tokenizer=True, **kwargs)


@given(ids=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40),
       k=st.one_of(st.none(), st.integers(1, 50)))
def test_truncate_prompt_keeps_the_last_k_tokens(ids, k):
    p = ProcessedPrompt("the text", list(ids))
    got = truncate_prompt(p, SamplingParams(truncate_prompt_tokens=k))
    want = ids if k is None else ids[len(ids) - min(k, len(ids)):]
    assert got.prompt_token_ids == want and got.prompt == "the text"
    assert p.prompt_token_ids == ids  # the input is not changed


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@given(words=st.lists(st.text(alphabet=" abcé😀,", min_size=1, max_size=8).filter(str.strip),
                      min_size=1, max_size=4))
def test_bad_words_token_ids_are_each_word_bare_and_after_a_space(words, tokenizer):
    got = bad_words_token_ids(TextCodec(tokenizer), words)
    note(f"{words!r} -> {got!r}")
    assert len({tuple(s) for s in got}) == len(got), "sequences are distinct"
    want_texts = []
    for w in words:
        for text in (w.lstrip(), " " + w.lstrip()):
            if text not in want_texts:
                want_texts.append(text)
    # Byte-level BPE round-trips, so each sequence is identified by its text; no BOS/EOS in them.
    assert [tokenizer.decode(s) for s in got] == want_texts
    assert all(s == tokenizer.encode(tokenizer.decode(s), add_special_tokens=False) for s in got)
    assert not any(t in tokenizer.all_special_ids for s in got for t in s)


# ---------------------------------------------------------------- the sampler's masks
def logits_rows(vocab: int):
    return st.builds(lambda seed, scale: torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * scale,
                     st.integers(0, 2**31), st.sampled_from([0.1, 1.0, 5.0]))


SMALL = 16  # a small vocabulary, so random masks overlap and often leave nothing
tokens = st.integers(0, SMALL - 1)


@st.composite
def controlled_rows(draw):
    """Random logits, output history and every step-1 control (each often absent)."""
    return dict(
        logits=draw(logits_rows(SMALL)),
        prompt=draw(st.lists(tokens, min_size=1, max_size=5)),
        output=draw(st.lists(tokens, max_size=6)),
        # few tokens each, so that together they often leave none (rule 0)
        grammar=draw(st.one_of(st.none(), st.lists(tokens, max_size=4, unique=True))),
        allowed=draw(st.one_of(st.none(), st.lists(tokens, min_size=1, max_size=4, unique=True))),
        bad=draw(st.lists(st.lists(tokens, min_size=1, max_size=3), max_size=4)),
        bias=draw(st.one_of(st.none(), st.dictionaries(tokens, st.floats(-100, 100), min_size=1, max_size=4))),
        min_tokens=draw(st.integers(0, 8)),
        ignore_eos=draw(st.booleans()),
        stop_ids=draw(st.lists(tokens, max_size=2)),
    )


def expected_scores(r) -> list[float]:
    """SPEC §6 step 1 per token, from its words: a token is out when the grammar or
    allowed_token_ids exclude it, when the output followed by it ends with a bad word, or when
    it is a stop token before min_tokens; otherwise its logit plus its bias."""
    out = []
    for t in range(SMALL):
        extended = r["output"] + [t]
        excluded = (
            (r["grammar"] is not None and t not in r["grammar"])
            or (r["allowed"] is not None and t not in r["allowed"])
            or any(extended[-len(w):] == w for w in r["bad"] if len(w) <= len(extended))
            or (len(r["output"]) < r["min_tokens"] and (t in r["stop_ids"] or (t == EOS and not r["ignore_eos"])))
        )
        out.append(-math.inf if excluded else float(r["logits"][t]) + (r["bias"] or {}).get(t, 0.0))
    return out


def params_of(r, **kwargs) -> SamplingParams:
    return SamplingParams(allowed_token_ids=r["allowed"], logit_bias=r["bias"], min_tokens=r["min_tokens"],
                          ignore_eos=r["ignore_eos"], stop_token_ids=r["stop_ids"], max_tokens=50, **kwargs)


def controls_of(r) -> TokenControls:
    return TokenControls(r["grammar"], r["bad"])


@given(r=controlled_rows())
def test_masks_and_bias_match_their_definition(r):
    got = process_logits(r["logits"], params_of(r), r["prompt"], r["output"], (EOS,), controls_of(r))
    want = expected_scores(r)
    biased = [t for t in (r["bias"] or {}) if not math.isinf(want[t])]
    event("logit_bias on a surviving token" if biased else "no surviving token biased")
    for t in range(SMALL):
        if math.isinf(want[t]):
            assert got[t] == -math.inf, f"token {t} should be masked"
        else:
            assert abs(float(got[t]) - want[t]) < 1e-4, (t, float(got[t]), want[t])


@given(r=controlled_rows(), temperature=st.sampled_from([0.0, 0.7, 1.5]), seed=st.integers(0, 2**40))
def test_sample_takes_a_surviving_token_or_none_without_drawing(r, temperature, seed):
    params = params_of(r, temperature=temperature, seed=seed)
    gen = None if params.greedy else torch.Generator().manual_seed(seed)
    state = None if gen is None else gen.get_state()
    token = sample(r["logits"], params, r["prompt"], r["output"], (EOS,), gen, controls_of(r))
    want = expected_scores(r)
    survivors = [t for t in range(SMALL) if not math.isinf(want[t])]
    note(f"survivors {survivors}, token {token}")
    event("rule 0: no token left" if not survivors else "a token left")
    if not survivors:  # rule 0: no token, and the generator is untouched
        assert token is None
        assert gen is None or torch.equal(gen.get_state(), state)
        return
    assert token in survivors
    if params.greedy:
        assert token == max(survivors, key=lambda t: (want[t], -t))


def test_rule_0_cases_from_the_spec():
    logits = torch.zeros(SMALL)
    # allowed_token_ids that the grammar excludes entirely
    assert sample(logits, SamplingParams(temperature=0, allowed_token_ids=[3]), [1], [], (EOS,), None,
                  TokenControls(allowed_by_grammar=[4, 5])) is None
    # the grammar's only token is EOS and min_tokens holds it back
    assert sample(logits, SamplingParams(temperature=0, min_tokens=2), [1], [], (EOS,), None,
                  TokenControls(allowed_by_grammar=[EOS])) is None
    # a one-token bad word that is the only allowed token
    assert sample(logits, SamplingParams(temperature=1.0, allowed_token_ids=[7]), [1], [], (EOS,),
                  torch.Generator().manual_seed(0), TokenControls(bad_words_ids=[[7]])) is None
    assert sample(logits, SamplingParams(temperature=0, allowed_token_ids=[7]), [1], [], (EOS,), None,
                  TokenControls(bad_words_ids=[[6, 7]])) == 7  # the output does not end with 6


def test_bad_words_look_at_the_output_not_the_prompt():
    logits = torch.zeros(SMALL)
    logits[7] = 10.0
    p = SamplingParams(temperature=0)
    bad = TokenControls(bad_words_ids=[[6, 7]])
    assert sample(logits, p, [1, 6], [], (EOS,), None, bad) == 7
    assert sample(logits, p, [1], [6], (EOS,), None, bad) != 7


# ---------------------------------------------------------------- the reference LLM
PROMPTS = ["The quick brown fox", "Once upon a time"]


def _greedy(ref_llm, prompt, **kwargs):
    return ref_llm.generate(prompt, SamplingParams(**{"temperature": 0, "max_tokens": 8, **kwargs}))[0]


def test_llm_allowed_token_ids_only(ref_llm):
    allowed = [40, 41, 300, EOS]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=10, allowed_token_ids=allowed) for s in range(3)]
    outs = ref_llm.generate(PROMPTS + PROMPTS[:1], params)
    seen = set()
    for out in outs:
        seen |= set(out.outputs[0].token_ids)
        assert set(out.outputs[0].token_ids) <= set(allowed), out.outputs[0].token_ids
    assert len(seen) > 1


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_llm_bad_words_never_appear_as_token_sequences(ref_llm):
    tok = ref_llm.get_tokenizer()
    codec = TextCodec(tok)
    base = _greedy(ref_llm, PROMPTS[0], max_tokens=12).outputs[0].token_ids
    # Words the unconstrained greedy output spells with exactly the tokens it generated.
    words = [w for w in {tok.decode(base[i:i + n]) for n in (1, 2) for i in range(len(base) - n + 1)}
             if w.strip() and any(_contains(base, s) for s in bad_words_token_ids(codec, [w]))]
    assert words, f"no bad word candidate in {base}"
    words = sorted(words)[:6]
    got = _greedy(ref_llm, PROMPTS[0], max_tokens=12, bad_words=words).outputs[0].token_ids
    for seq in bad_words_token_ids(codec, words):
        assert not _contains(got, seq), (words, seq, got)
    assert got != base


def test_llm_logit_bias_makes_greedy_pick_the_token(ref_llm):
    base = _greedy(ref_llm, PROMPTS[1]).outputs[0].token_ids
    target = next(t for t in range(3, VOCAB) if t not in base)
    got = _greedy(ref_llm, PROMPTS[1], logit_bias={target: 100.0}).outputs[0].token_ids
    assert got == [target] * 8
    assert _greedy(ref_llm, PROMPTS[1], logit_bias={base[0]: -100.0}).outputs[0].token_ids[0] != base[0]


def test_llm_logprobs_stay_raw_under_masks(ref_llm):
    base = _greedy(ref_llm, PROMPTS[0], max_tokens=1, logprobs=3).outputs[0]
    top = base.token_ids[0]
    masked = _greedy(ref_llm, PROMPTS[0], max_tokens=1, logprobs=3, allowed_token_ids=[77],
                     logit_bias={77: 50.0}).outputs[0]
    assert masked.token_ids == [77]
    entry, raw = masked.logprobs[0], base.logprobs[0]
    assert top in entry and entry[top].rank == 1, "the raw top token is still ranked first"
    for t in set(entry) & set(raw):
        assert entry[t].logprob == pytest.approx(raw[t].logprob, abs=1e-6)
    assert entry[77].logprob < 0 and entry[77].rank > 1


def test_llm_truncate_prompt_tokens_keeps_the_last_k(ref_llm):
    full = ref_llm.get_tokenizer().encode(PROMPTS[0])
    assert len(full) > 3
    out = _greedy(ref_llm, PROMPTS[0], max_tokens=2, truncate_prompt_tokens=3)
    assert out.prompt_token_ids == full[-3:] and out.prompt == PROMPTS[0]
    same = _greedy(ref_llm, {"prompt_token_ids": full[-3:]}, max_tokens=2)
    assert out.outputs[0].token_ids == same.outputs[0].token_ids
    # the length check sees the kept tokens: a prompt longer than max_model_len is fine truncated
    long_ids = {"prompt_token_ids": [5] * (ref_llm.llm_engine.max_model_len + 10)}
    assert _greedy(ref_llm, long_ids, max_tokens=1, truncate_prompt_tokens=4).prompt_token_ids == [5] * 4


def test_llm_rejects_out_of_vocab_controls_before_queueing(ref_llm):
    engine = ref_llm.llm_engine
    with pytest.raises(ValueError, match="^allowed_token_ids must be in"):
        ref_llm.generate(PROMPTS, [SamplingParams(), SamplingParams(allowed_token_ids=[VOCAB])])
    with pytest.raises(ValueError, match="^logit_bias keys must be in"):
        engine.add_request("x", PROMPTS[0], SamplingParams(logit_bias={VOCAB: 1.0}))
    assert not engine.has_unfinished_requests()
