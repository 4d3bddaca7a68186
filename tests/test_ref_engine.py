"""The reference engine: determinism, batch invariance, stops, logprobs, n > 1, bad inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from conformance.compare import LOGIT_ATOL, check_request_outputs
from ref import LLM, SamplingParams
from ref.outputs import RequestOutput

VOCAB = 512


def token_prompts(min_size=1, max_size=48):
    return st.lists(st.integers(3, VOCAB - 1), min_size=min_size, max_size=max_size).map(
        lambda ids: {"prompt_token_ids": ids})


@st.composite
def sampling_params(draw, max_tokens=16):
    greedy = draw(st.booleans())
    kw = dict(
        max_tokens=draw(st.integers(1, max_tokens)),
        ignore_eos=True,
        repetition_penalty=draw(st.sampled_from([1.0, 1.3])),
        presence_penalty=draw(st.sampled_from([0.0, 0.5])),
        frequency_penalty=draw(st.sampled_from([0.0, -0.3])),
        logprobs=draw(st.sampled_from([None, 0, 3])),
    )
    if greedy:
        return SamplingParams(temperature=0, **kw)
    return SamplingParams(
        temperature=draw(st.sampled_from([0.5, 1.0])), top_p=draw(st.sampled_from([1.0, 0.8])),
        top_k=draw(st.sampled_from([0, 20])), min_p=draw(st.sampled_from([0.0, 0.05])),
        seed=draw(st.integers(0, 2**32)), n=draw(st.integers(1, 3)), **kw)


def check_against(llm: LLM, requests, oracle, candidate):
    engine = llm.llm_engine
    reqs = [(p["prompt_token_ids"], sp) for p, sp in requests]
    check_request_outputs(engine.model, engine.model_config.eos_token_ids, reqs, oracle, candidate)


@given(target=st.tuples(token_prompts(), sampling_params()),
       others=st.lists(st.tuples(token_prompts(), sampling_params()), min_size=1, max_size=6),
       position=st.integers(0, 6))
def test_batch_invariance(ref_llm, target, others, position):
    """A seeded/greedy request yields the same output alone and inside any batch."""
    alone = ref_llm.generate(*target)
    batch = list(others)
    batch.insert(min(position, len(batch)), target)
    outs = ref_llm.generate([p for p, _ in batch], [sp for _, sp in batch])
    idx = batch.index(target)
    check_against(ref_llm, [target], alone, [outs[idx]])


@given(prompt=token_prompts(), params=sampling_params())
def test_same_seed_same_output(tiny_model_dir, prompt, params):
    a = LLM(tiny_model_dir, seed=5).generate(prompt, params)[0]
    b = LLM(tiny_model_dir, seed=5).generate(prompt, params)[0]
    assert a.outputs == b.outputs


def test_unseeded_requests_follow_the_engine_seed(tiny_model_dir):
    p = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 6, 7]}] * 3
    run = lambda seed: [o.outputs[0].token_ids for o in LLM(tiny_model_dir, seed=seed).generate(prompts, p)]  # noqa: E731
    assert run(1) == run(1)
    assert run(1) != run(2)


@given(prompt=token_prompts(max_size=20), logprobs=st.integers(0, 5), prompt_logprobs=st.integers(0, 5))
def test_logprobs_are_teacher_forced_log_softmax(ref_llm, prompt, logprobs, prompt_logprobs):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=logprobs,
                            prompt_logprobs=prompt_logprobs)
    out = ref_llm.generate(prompt, params)[0]
    ids, gen = prompt["prompt_token_ids"], out.outputs[0]
    full = ids + gen.token_ids
    lp = torch.log_softmax(ref_llm.llm_engine.model.teacher_forced_logits(full), -1)
    atol = LOGIT_ATOL[torch.float32]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for i in range(1, len(ids)):
        entry = out.prompt_logprobs[i]
        assert next(iter(entry)) == ids[i] and len(entry) >= prompt_logprobs
        assert abs(entry[ids[i]].logprob - float(lp[i - 1, ids[i]])) < atol
    total = 0.0
    for j, tok in enumerate(gen.token_ids):
        row = lp[len(ids) + j - 1]
        entry = gen.logprobs[j]
        assert next(iter(entry)) == tok and len(entry) in (logprobs, logprobs + 1)
        assert abs(entry[tok].logprob - float(row[tok])) < atol
        assert entry[tok].rank == 1  # greedy picks the top raw logprob (no penalties here)
        total += float(row[tok])
    assert abs(gen.cumulative_logprob - total) < atol * len(gen.token_ids)


def test_no_logprobs_means_none(ref_llm):
    out = ref_llm.generate({"prompt_token_ids": [4, 5]}, SamplingParams(max_tokens=3, seed=1))[0]
    assert out.prompt_logprobs is None and out.outputs[0].logprobs is None
    assert out.outputs[0].cumulative_logprob is None


@given(prompt=token_prompts(max_size=10), n=st.integers(2, 4), seed=st.integers(0, 2**30))
def test_n_samples_equal_separate_seeded_requests(ref_llm, prompt, n, seed):
    params = SamplingParams(n=n, seed=seed, max_tokens=8, ignore_eos=True)
    out = ref_llm.generate(prompt, params)[0]
    assert [c.index for c in out.outputs] == list(range(n))
    for i, c in enumerate(out.outputs):
        single = ref_llm.generate(prompt, params.for_sample(i).__class__(
            **{**params.__dict__, "n": 1, "seed": params.for_sample(i).seed}))[0]
        assert single.outputs[0].token_ids == c.token_ids


# ------------------------------------------------------------------------ stop handling

def _greedy_text(llm, prompt, max_tokens=24):
    return llm.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))[0].outputs[0]


@given(data=st.data(), include=st.booleans())
def test_stop_string_trims_text(ref_llm, data, include):
    prompt = {"prompt_token_ids": data.draw(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=12))}
    base = _greedy_text(ref_llm, prompt)
    text = base.text
    if len(text) < 2:
        return
    start = data.draw(st.integers(0, len(text) - 1))
    stop = text[start: start + data.draw(st.integers(1, 4))]
    out = ref_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
                                                  include_stop_str_in_output=include))[0].outputs[0]
    pos = text.find(stop)
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == (text[: pos + len(stop)] if include else text[:pos])
    assert base.token_ids[: len(out.token_ids)] == out.token_ids
    # It stopped at the first token whose text completes the stop string, not later.
    shorter = ref_llm.llm_engine.codec.decode(out.token_ids[:-1])
    assert stop not in shorter


@given(data=st.data())
def test_stop_token_ids(ref_llm, data):
    prompt = {"prompt_token_ids": data.draw(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=12))}
    base = _greedy_text(ref_llm, prompt, 16)
    j = data.draw(st.integers(0, len(base.token_ids) - 1))
    tok = base.token_ids[j]
    out = ref_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                  stop_token_ids=[tok]))[0].outputs[0]
    first = base.token_ids.index(tok)
    assert out.token_ids == base.token_ids[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", tok)
    assert out.text == ref_llm.llm_engine.codec.decode(base.token_ids[:first])  # stop token not in text


def test_min_tokens_defers_stop_token(ref_llm):
    prompt = {"prompt_token_ids": [10, 20, 30]}
    base = _greedy_text(ref_llm, prompt, 16)
    tok = base.token_ids[0]
    out = ref_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                  stop_token_ids=[tok], min_tokens=4))[0].outputs[0]
    assert tok not in out.token_ids[:4]
    assert len(out.token_ids) >= 4


def test_max_tokens_and_max_model_len(tiny_model_dir):
    llm = LLM(tiny_model_dir, max_model_len=32)
    p = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    a, b = llm.generate([{"prompt_token_ids": [5] * 10}, {"prompt_token_ids": [5] * 29}], p)
    assert len(a.outputs[0].token_ids) == 10 and a.outputs[0].finish_reason == "length"
    assert len(b.outputs[0].token_ids) == 3 and b.outputs[0].finish_reason == "length"
    full = llm.generate({"prompt_token_ids": [5] * 32}, p)[0]  # a full-length prompt yields one token
    assert len(full.outputs[0].token_ids) == 1


def test_sequence_eos_rules():
    from ref.sequence import Sequence, StopContext
    from ref.tokenizer import TextCodec

    ctx = StopContext(eos_token_ids=(2,), max_model_len=100, codec=TextCodec(None))
    seq = Sequence(0, SamplingParams(max_tokens=10), None)
    seq.append(7, 3, ctx)
    seq.append(2, 3, ctx)
    assert (seq.finish_reason, seq.stop_reason, seq.output_ids) == ("stop", None, [7, 2])
    seq = Sequence(0, SamplingParams(max_tokens=10, ignore_eos=True), None)
    seq.append(2, 3, ctx)
    assert not seq.finished
    seq = Sequence(0, SamplingParams(max_tokens=10, min_tokens=2), None)
    seq.append(2, 3, ctx)
    assert not seq.finished
    seq.append(2, 3, ctx)
    assert seq.finish_reason == "stop"


# ------------------------------------------------------------------------ bad inputs

def _bad_requests(vocab, max_len):
    return [
        ("", SamplingParams(), "prompt must be a non-empty"),
        ({"prompt_token_ids": []}, SamplingParams(), "prompt_token_ids must be non-empty"),
        ({"prompt_token_ids": [vocab]}, SamplingParams(), r"prompt_token_ids must be in \[0, 512\)"),
        ({"prompt_token_ids": [-1]}, SamplingParams(), r"prompt_token_ids must be in"),
        ({"prompt_token_ids": [3] * (max_len + 1)}, SamplingParams(), "prompt length must be <= max_model_len"),
        ({"prompt_token_ids": [3]}, SamplingParams(logprobs=21), r"logprobs must be <= max_logprobs \(20\)"),
        ({"prompt_token_ids": [3]}, SamplingParams(prompt_logprobs=99), "prompt_logprobs must be <= max_logprobs"),
        ({"prompt_token_ids": [3]}, SamplingParams(stop_token_ids=[vocab]), "stop_token_ids must be in"),
        ({"tokens": [3]}, SamplingParams(), "prompt_token_ids"),
        (42, SamplingParams(), "prompt must be a string"),
    ]


@pytest.mark.parametrize("case", range(10))
def test_bad_request_rejected_before_state_changes(tiny_model_dir, case):
    llm = LLM(tiny_model_dir, max_model_len=64)
    engine = llm.llm_engine
    prompt, params, match = _bad_requests(512, 64)[case]
    good = {"prompt_token_ids": [5, 6, 7]}
    with pytest.raises(ValueError, match=match):
        llm.generate([good, prompt], params if case != 8 else None)
    assert not engine.has_unfinished_requests() and not engine.waiting
    with pytest.raises(ValueError, match=match):
        engine.add_request("x", prompt, params)
    assert not engine.has_unfinished_requests()
    out = llm.generate(good, SamplingParams(temperature=0, max_tokens=3))  # still serving
    assert len(out[0].outputs[0].token_ids) >= 1


def test_duplicate_request_id_and_unknown_option(tiny_model_dir):
    llm = LLM(tiny_model_dir)
    llm.llm_engine.add_request("a", {"prompt_token_ids": [3]})
    with pytest.raises(ValueError, match="already in use"):
        llm.llm_engine.add_request("a", {"prompt_token_ids": [4]})
    with pytest.raises(ValueError, match="unknown engine option"):
        LLM(tiny_model_dir, max_batchh=3)
    with pytest.raises(ValueError, match="dtype"):
        LLM(tiny_model_dir, dtype="float64")


def test_abort_mid_batch(tiny_model_dir):
    llm = LLM(tiny_model_dir)
    engine = llm.llm_engine
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for rid in "abc":
        engine.add_request(rid, {"prompt_token_ids": [3, 4, 5]}, p)
    engine.step()
    engine.abort_request("b")
    finished: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id != "b"
            if out.finished:
                finished[out.request_id] = out
    assert sorted(finished) == ["a", "c"]
    assert all(len(o.outputs[0].token_ids) == 8 for o in finished.values())


def test_checkpoint_without_tokenizer(tmp_path):
    from ref.models import tiny_checkpoint

    path = tiny_checkpoint(cache_dir=tmp_path, tokenizer=False)
    llm = LLM(str(path))
    out = llm.generate({"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=4, seed=0, logprobs=1))[0]
    assert out.outputs[0].text == "" and len(out.outputs[0].token_ids) == 4
    assert out.outputs[0].logprobs[0][out.outputs[0].token_ids[0]].decoded_token is None
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello")
    with pytest.raises(ValueError, match="stop"):
        llm.generate({"prompt_token_ids": [5]}, SamplingParams(stop=["x"]))


def test_text_prompt_round_trip(ref_llm):
    out = ref_llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=5))[0]
    assert out.prompt == "Once upon a time"
    assert out.prompt_token_ids == ref_llm.get_tokenizer().encode("Once upon a time")


def test_kv_reservation_is_reported(tiny_model_dir):
    llm = LLM(tiny_model_dir)
    llm.generate([{"prompt_token_ids": [3] * 5}, {"prompt_token_ids": [3] * 50}],
                 SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    m = llm.llm_engine.get_metrics()
    assert m.kv_slots_reserved_peak == 2 * 60  # both rows reserve the longest prompt + max_tokens
    assert 0 < m.kv_utilization < 1
