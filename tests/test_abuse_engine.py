"""Abuse at the edges of the library API, for both engines (issue: hardening).

Each test is a regression test of a defect found by abuse testing: a request id shaped like an
internal one, a huge `n`, ill-typed fields, a prompt that is not valid Unicode, and params
changed after they were queued. Bounded: tiny model, a handful of requests each.
"""

from __future__ import annotations

import math

import pytest

import fast
import ref
from ref import SamplingParams

ENGINES = {"fast": fast, "ref": ref}
OPTIONS = {"fast": {"max_model_len": 64, "num_kv_blocks": 16, "block_size": 8}, "ref": {"max_model_len": 64}}
SAMPLE = SamplingParams(temperature=0.8, seed=1, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module", params=sorted(ENGINES))
def engine(request, tiny_model_dir):
    """A fresh LLMEngine of each kind (module-scoped: tests leave it empty)."""
    mod = ENGINES[request.param]
    eng = mod.LLMEngine(mod.EngineConfig.from_options(tiny_model_dir, OPTIONS[request.param]))
    yield eng
    assert not eng.has_unfinished_requests()


def drain(engine, max_steps: int = 500) -> dict:
    finished = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return finished
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    raise AssertionError(f"requests did not finish within {max_steps} steps")


def assert_kv_free(engine) -> None:
    if hasattr(engine, "kv"):
        engine.kv.check_invariants()
        assert engine.kv.num_free_blocks == engine.num_blocks


# ---------------------------------------------------------------- 1. ids
@pytest.mark.parametrize("user_id", ["x#1", "x#0", "x", "('x', 1)"])
def test_user_id_shaped_like_a_sample_id_is_independent(engine, user_id):
    """Request "x" with n=2 has a second sample; a user id spelt like it must not collide."""
    engine.add_request("x" if user_id != "x" else "y", {"prompt_token_ids": [5, 6, 7]},
                       SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=4, ignore_eos=True))
    engine.add_request(user_id, {"prompt_token_ids": [9, 10, 11, 12]}, SAMPLE)
    finished = drain(engine)
    assert set(finished) == {"x" if user_id != "x" else "y", user_id}
    assert [len(c.token_ids) for c in finished[user_id].outputs] == [4]
    assert_kv_free(engine)


@pytest.mark.parametrize("bad", [5, None, "", b"x", ("x",)])
def test_request_id_must_be_a_non_empty_string(engine, bad):
    with pytest.raises(ValueError, match="request_id must be a non-empty string"):
        engine.add_request(bad, {"prompt_token_ids": [1, 2]}, SAMPLE)
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("bad", [5, None, [1, "a"], {"a": 1}])
def test_abort_request_rejects_non_string_ids(engine, bad):
    engine.add_request("keep", {"prompt_token_ids": [1, 2]}, SAMPLE)
    with pytest.raises(ValueError, match="request_id must be a string or a list of strings"):
        engine.abort_request(bad)
    assert engine.has_unfinished_requests()  # nothing was aborted
    engine.abort_request(["keep", "unknown"])
    assert not engine.has_unfinished_requests()
    assert_kv_free(engine)


@pytest.mark.parametrize("bad", [True, 1.5, "1"])
def test_priority_must_be_an_integer(engine, bad):
    with pytest.raises(ValueError, match="priority must be an integer"):
        engine.add_request("p", {"prompt_token_ids": [1, 2]}, SAMPLE, priority=bad)
    assert not engine.has_unfinished_requests()


# ---------------------------------------------------------------- 2. n
def test_n_above_max_n_is_rejected(tiny_model_dir):
    for mod, opts in ((fast, {"max_n": 4, "max_model_len": 64}), (ref, {"max_n": 4, "max_model_len": 64})):
        eng = mod.LLMEngine(mod.EngineConfig.from_options(tiny_model_dir, opts))
        with pytest.raises(ValueError, match=r"n must be <= max_n \(4\), got 5"):
            eng.add_request("a", {"prompt_token_ids": [1]}, SamplingParams(n=5, temperature=1.0))
        assert not eng.has_unfinished_requests()
        eng.add_request("a", {"prompt_token_ids": [1]}, SamplingParams(n=4, temperature=1.0, max_tokens=2))
        assert [len(o.outputs) for o in drain(eng).values()] == [4]


def test_default_max_n_is_documented_value(tiny_model_dir):
    eng = fast.LLMEngine(fast.EngineConfig.from_options(tiny_model_dir, {"max_model_len": 64}))
    with pytest.raises(ValueError, match=r"n must be <= max_n \(128\), got 129"):
        eng.add_request("a", {"prompt_token_ids": [1]}, SamplingParams(n=129, temperature=1.0))


@pytest.mark.parametrize("bad", [0, -1])
def test_max_n_option_is_validated(tiny_model_dir, bad):
    with pytest.raises(ValueError, match="max_n must be >= 1"):
        fast.EngineConfig.from_options(tiny_model_dir, {"max_n": bad})


@pytest.mark.parametrize("when", ["queued", "forked", "mid-decode"])
def test_abort_of_a_large_n_request_frees_everything(tiny_model_dir, when):
    """Abort of a request with many samples, before they fork, after, and while decoding:
    every sample ends "abort", no block is leaked, other requests go on."""
    eng = fast.LLMEngine(fast.EngineConfig.from_options(
        tiny_model_dir, {"max_model_len": 64, "max_n": 512, "max_num_seqs": 64, "num_kv_blocks": 64,
                         "block_size": 8}))
    eng.add_request("big", {"prompt_token_ids": list(range(1, 20))},
                    SamplingParams(n=512, temperature=1.0, seed=0, max_tokens=8, ignore_eos=True))
    eng.add_request("other", {"prompt_token_ids": [3, 4, 5]}, SAMPLE)
    for _ in range({"queued": 0, "forked": 1, "mid-decode": 3}[when]):
        eng.step()
    group = eng.groups["big"]
    eng.abort_request("big")
    assert all(s.finish_reason in ("abort", "length") for s in group.samples)
    assert "big" not in eng.groups and "other" in eng.groups
    eng.scheduler.check_invariants()
    drain(eng)
    assert_kv_free(eng)
    assert not eng.scheduler.running and not eng.scheduler.waiting


# ---------------------------------------------------------------- 5. field types
@pytest.mark.parametrize("field,value", [
    ("stop", 5), ("stop", 0), ("stop", False), ("stop", {"x": 1}), ("stop", 1.5), ("stop", [5]),
    ("stop", ["ok", None]), ("stop_token_ids", 1.5), ("stop_token_ids", 3), ("stop_token_ids", "12"),
    ("stop_token_ids", [1.5]), ("stop_token_ids", [True]), ("stop_token_ids", {1: 2}),
])
def test_ill_typed_stop_fields_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field,value,match", [
    ("stop", ["s"] * 65, "stop must have at most 64 strings"),
    ("stop", ["x" * 1025], "stop strings must be at most 1024 characters"),
    ("stop_token_ids", [1] * 1025, "stop_token_ids must have at most 1024 ids"),
])
def test_stop_lists_are_bounded(engine, field, value, match):
    with pytest.raises(ValueError, match=match):
        engine.add_request("s", "hello", SamplingParams(**{field: value}))
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("prompt", ["\ud800", "ok \udfff then", {"prompt_token_ids": [1], "prompt": 5}])
def test_invalid_prompt_text_is_a_value_error(engine, prompt):
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("u", prompt, SAMPLE)
    assert not engine.has_unfinished_requests()


def test_params_changed_after_add_do_not_change_the_request(engine):
    """The engine keeps its own copy: the caller's later edits (even invalid ones) are ignored."""
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=5, ignore_eos=True)
    expected = SamplingParams(temperature=0.8, seed=7, max_tokens=5, ignore_eos=True)
    engine.add_request("m", {"prompt_token_ids": [2, 3, 4]}, params)
    params.temperature, params.max_tokens, params.stop = math.nan, 1, 7
    got = drain(engine)["m"].outputs[0].token_ids
    engine.add_request("m2", {"prompt_token_ids": [2, 3, 4]}, expected)
    assert drain(engine)["m2"].outputs[0].token_ids == got and len(got) == 5


def test_params_made_invalid_before_add_are_rejected(engine):
    params = SamplingParams(temperature=0.5)
    params.temperature = math.nan
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request("v", "hello", params)
    assert not engine.has_unfinished_requests()


# ---------------------------------------------------------------- newcomer: help(LLM)
def test_help_of_llm_lists_every_option_with_its_default():
    import dataclasses

    for mod in (fast, ref):
        doc = mod.LLM.__doc__
        for f in dataclasses.fields(mod.EngineConfig):
            if f.name == "model":
                continue
            assert f"{f.name}={f.default!r}".replace("'", '"') in doc, (mod.__name__, f.name)
