"""AsyncLLMEngine: same outputs as fast.LLM, cumulative streaming, validation, abort frees blocks."""

from __future__ import annotations

import asyncio
import json
import os
import threading

import pytest
from hypothesis import given, note, strategies as st

from fast import LLM, LLMEngine, SamplingParams
from fast.engine.async_llm_engine import AsyncLLMEngine, EngineDeadError, NewRequest, RequestStats, TokenCountBound
from fast.config import EngineConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

OPTIONS = dict(max_num_seqs=8, max_model_len=256, block_size=8, num_kv_blocks=96)
WAIT_S = 10.0  # bound on "soon": an abort is applied before the next step

PROMPTS = ["Once upon a time", "The engine reads a request", "def add(a, b):", "Rivers flow to the ocean"]
PARAMS = [
    SamplingParams(temperature=0, max_tokens=12),
    SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=10, logprobs=2),
    SamplingParams(temperature=1.0, top_k=20, min_p=0.05, seed=1, n=2, max_tokens=9, stop=[" the"]),
    SamplingParams(temperature=0.7, seed=3, repetition_penalty=1.2, presence_penalty=0.5, max_tokens=11),
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig.from_options(tiny_model_dir, OPTIONS))


@pytest.fixture(scope="module")
def oracle(tiny_model_dir):
    """fast.LLM with the same options: what the async engine must reproduce."""
    return LLM(tiny_model_dir, **OPTIONS)


@pytest.fixture
def aengine(engine):
    """A fresh async front per test over the shared engine; checks the test left the engine idle
    with as many free blocks as it found (so a leak fails the test that caused it, only)."""
    free_before = engine.kv.num_free_blocks
    front = AsyncLLMEngine(engine)
    yield front
    front.check_invariants()
    assert not engine.has_unfinished_requests(), "requests left in the engine"
    assert engine.kv.num_free_blocks == free_before, (
        f"KV blocks leaked: {engine.kv.num_free_blocks} free after the test, {free_before} before")
    engine.kv.check_invariants()


def assert_same_output(got, expected, name: str) -> None:
    assert len(got.outputs) == len(expected.outputs), f"{name}: sample count"
    for g, e in zip(got.outputs, expected.outputs):
        for field in ("token_ids", "text", "finish_reason", "stop_reason", "cumulative_logprob", "logprobs"):
            assert getattr(g, field) == getattr(e, field), (
                f"{name} sample {g.index}: {field} differs: async={getattr(g, field)!r} llm={getattr(e, field)!r}")


async def collect(aengine: AsyncLLMEngine, prompt, params, rid: str) -> list:
    return [out async for out in aengine.generate(prompt, params, rid)]


async def wait_until(cond, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {WAIT_S}s: {what}")
        await asyncio.sleep(0.01)


def test_concurrent_generate_equals_llm(aengine, oracle):
    """Requests started together are batched as LLM.generate batches them: identical outputs."""
    async def main():
        return await asyncio.gather(*(collect(aengine, p, sp, f"r{i}")
                                      for i, (p, sp) in enumerate(zip(PROMPTS, PARAMS))))

    streams = asyncio.run(main())
    expected = oracle.generate(PROMPTS, PARAMS, use_tqdm=False)
    for i, (outs, exp) in enumerate(zip(streams, expected)):
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True], f"r{i}: finished flags"
        assert all(o.request_id == f"r{i}" for o in outs)
        assert_same_output(outs[-1], exp, f"r{i}")


def test_outputs_are_cumulative(aengine):
    """Each output extends the previous one, token by token."""
    outs = asyncio.run(collect(aengine, PROMPTS[0], SamplingParams(temperature=0, max_tokens=8), "c"))
    ids = [o.outputs[0].token_ids for o in outs]
    for prev, cur in zip(ids, ids[1:]):
        assert cur[: len(prev)] == prev and len(cur) > len(prev), f"not cumulative: {prev} -> {cur}"
    assert len(ids[-1]) == 8 and outs[-1].outputs[0].finish_reason == "length"


def test_sequential_runs_on_new_event_loops(aengine, oracle):
    """One async engine serves several asyncio.run calls in a row (the loop is re-bound)."""
    for i in range(2):
        params = SamplingParams(seed=11 + i, max_tokens=6)
        got = asyncio.run(collect(aengine, PROMPTS[1], params, f"s{i}"))[-1]
        assert_same_output(got, oracle.generate(PROMPTS[1], params, use_tqdm=False)[0], f"s{i}")


def test_bad_request_rejected_before_anything_is_queued(aengine, engine):
    async def main():
        good = NewRequest("ok", PROMPTS[0], SamplingParams(max_tokens=4))
        too_long = NewRequest("long", {"prompt_token_ids": [5] * 300}, SamplingParams())
        with pytest.raises(ValueError, match="prompt length must be <= max_model_len"):
            await aengine.add_requests([good, too_long])
        assert not engine.has_unfinished_requests() and aengine.num_in_flight == 0
        with pytest.raises(ValueError, match="logprobs must be <= max_logprobs"):
            await collect(aengine, PROMPTS[0], SamplingParams(logprobs=21), "lp")
        with pytest.raises(ValueError, match="request_id must be unique"):
            await aengine.add_requests([good, good])
        stream = await aengine.add_requests([good])
        await aengine.between_steps(aengine.check_invariants)
        with pytest.raises(ValueError, match="already in use"):
            await aengine.add_requests([good])
        async with stream:
            outs = [o async for batch in stream for o in batch]
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"

    asyncio.run(main())


def test_closing_the_iterator_aborts_and_frees_blocks(aengine, engine):
    async def main():
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        gen = aengine.generate(PROMPTS[2], params, "long")
        first = await gen.__anext__()
        assert not first.finished
        assert engine.kv.num_free_blocks < engine.num_blocks
        await gen.aclose()
        await wait_until(lambda: not engine.has_unfinished_requests(), "request aborted in the engine")

    asyncio.run(main())


def test_cancelling_the_consumer_task_aborts(aengine, engine):
    async def main():
        started = asyncio.Event()

        async def consume():
            async for _ in aengine.generate(PROMPTS[3], SamplingParams(max_tokens=200, ignore_eos=True, seed=0), "t"):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: not engine.has_unfinished_requests(), "request aborted in the engine")

    asyncio.run(main())


def test_external_abort_ends_the_stream_with_abort(aengine):
    async def main():
        outs = []
        async for out in aengine.generate(PROMPTS[0], SamplingParams(n=2, seed=4, max_tokens=200), "x"):
            outs.append(out)
            if len(outs) == 2:
                aengine.abort("x")
        return outs

    outs = asyncio.run(main())
    last = outs[-1]
    assert last.finished and len(outs) == 3
    assert [c.finish_reason for c in last.outputs] == ["abort", "abort"]
    assert last.outputs[0].token_ids[: len(outs[1].outputs[0].token_ids)] == outs[1].outputs[0].token_ids


def test_finish_listener_reports_each_request_once(aengine):
    seen: list[RequestStats] = []
    aengine.add_finish_listener(seen.append)

    async def main():
        await collect(aengine, PROMPTS[0], SamplingParams(temperature=0, max_tokens=5), "a")
        gen = aengine.generate(PROMPTS[1], SamplingParams(seed=2, max_tokens=100), "b")
        await gen.__anext__()
        await gen.aclose()

    asyncio.run(main())
    assert [(s.request_id, s.finish_reason) for s in seen] == [("a", "length"), ("b", "abort")]
    a = seen[0]
    assert a.num_generation_tokens == 5 and a.num_prompt_tokens > 0
    assert a.ttft_s is not None and a.ttft_s >= 0 and a.tpot_s is not None and a.tpot_s >= 0


def test_a_failing_step_fails_every_stream(engine):
    aengine = AsyncLLMEngine(engine)

    def broken_step():
        raise RuntimeError("boom")

    async def main():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(engine, "step", broken_step)
            with pytest.raises(EngineDeadError, match="boom"):
                await collect(aengine, PROMPTS[0], SamplingParams(max_tokens=4), "dead")
        assert not aengine.is_running
        with pytest.raises(EngineDeadError):
            await aengine.add_requests([NewRequest("again", PROMPTS[0], SamplingParams())])

    free_before = engine.kv.num_free_blocks
    asyncio.run(main())
    engine.abort_request("dead")  # the engine itself is fine; a new front may use it
    assert engine.kv.num_free_blocks == free_before


@given(plan=st.lists(st.tuples(st.integers(1, 12), st.one_of(st.none(), st.integers(0, 4))),
                     min_size=1, max_size=10))
def test_random_aborts_leave_nothing_behind(engine, oracle, plan):
    """Requests abandoned after k outputs are aborted; the rest finish exactly as LLM.generate."""
    note(f"plan (max_tokens, abandon after k outputs or None): {plan}")
    free_before = engine.kv.num_free_blocks
    aengine = AsyncLLMEngine(engine)
    stats: list[RequestStats] = []
    aengine.add_finish_listener(stats.append)

    async def run(i: int, max_tokens: int, abandon_after: int | None):
        params = SamplingParams(seed=i, max_tokens=max_tokens, ignore_eos=True)
        outs = []
        async for out in aengine.generate(PROMPTS[i % len(PROMPTS)], params, f"h{i}"):
            outs.append(out)
            await aengine.between_steps(aengine.check_invariants)
            if abandon_after is not None and len(outs) > abandon_after:
                break
        return outs

    async def main():
        results = await asyncio.gather(*(run(i, m, k) for i, (m, k) in enumerate(plan)))
        await wait_until(lambda: not engine.has_unfinished_requests(), "aborts applied")
        await aengine.between_steps(aengine.check_invariants)
        return results

    results = asyncio.run(main())
    assert engine.kv.num_free_blocks == free_before, "KV blocks leaked"
    engine.kv.check_invariants()
    assert sorted(s.request_id for s in stats) == sorted(f"h{i}" for i in range(len(plan))), "one report each"
    for i, ((max_tokens, k), outs) in enumerate(zip(plan, results)):
        if outs[-1].finished:
            c = outs[-1].outputs[0]
            assert len(c.token_ids) == max_tokens and c.finish_reason == "length", f"h{i}: {c}"
            expected = oracle.generate(PROMPTS[i % len(PROMPTS)], SamplingParams(seed=i, max_tokens=max_tokens,
                                                                                 ignore_eos=True), use_tqdm=False)
            assert c.token_ids == expected[0].outputs[0].token_ids, f"h{i}: tokens differ from LLM.generate"
        else:
            assert k is not None and len(outs) == k + 1, f"h{i}: stopped early without being abandoned"


# ---------------------------------------------------------------------------------- tokenization
class _BlockingEncode:
    """Wraps `codec.encode`: each call waits (in whatever thread runs it) until released, and
    records its thread and whether a step was running meanwhile."""

    def __init__(self, encode, steps: "_StepSpy"):
        self._encode, self._steps = encode, steps
        self.started, self.release = threading.Event(), threading.Event()
        self.threads: list[int] = []
        self.released: list[bool] = []
        self.beside_a_step = False

    def __call__(self, prompt: str) -> list[int]:
        self.threads.append(threading.get_ident())
        self.started.set()
        self.released.append(self.release.wait(WAIT_S))  # False: nothing released it (loop blocked)
        self.beside_a_step |= self._steps.running
        return self._encode(prompt)


class _StepSpy:
    def __init__(self, step):
        self._step, self.running = step, False

    def __call__(self):
        self.running = True
        try:
            return self._step()
        finally:
            self.running = False


def test_tokenization_runs_off_the_event_loop_and_never_beside_a_step(aengine, engine, monkeypatch):
    """While a prompt is tokenized the loop keeps serving other coroutines, and no step runs (the
    tokenizer is shared with the step thread)."""
    steps = _StepSpy(engine.step)
    monkeypatch.setattr(engine, "step", steps)
    encode = _BlockingEncode(engine.codec.encode, steps)
    monkeypatch.setattr(engine.codec, "encode", encode)

    async def main():
        busy = asyncio.create_task(collect(aengine, {"prompt_token_ids": [5] * 8},
                                           SamplingParams(max_tokens=40, ignore_eos=True), "busy"))
        await wait_until(engine.has_unfinished_requests, "the busy request is queued")
        add = asyncio.create_task(aengine.add_requests([NewRequest("slow", PROMPTS[0], SamplingParams(max_tokens=3))]))
        await wait_until(encode.started.is_set, "tokenization started")
        for _ in range(3):  # the loop is free: these sleeps end while encode still waits
            await asyncio.sleep(0.01)
        encode.release.set()
        async with await add as stream:
            outs = [o async for batch in stream for o in batch]
        return outs[-1], (await busy)[-1]

    loop_thread = threading.get_ident()
    slow, busy = asyncio.run(main())
    assert encode.released == [True], "the event loop was blocked while the prompt was tokenized"
    assert encode.threads and loop_thread not in encode.threads
    assert not encode.beside_a_step, "a step ran while the prompt was tokenized"
    assert len(slow.outputs[0].token_ids) == 3 and len(busy.outputs[0].token_ids) == 40


def test_a_caller_cancelled_during_tokenization_leaves_nothing_queued(aengine, engine, monkeypatch):
    encode = _BlockingEncode(engine.codec.encode, _StepSpy(engine.step))
    monkeypatch.setattr(engine.codec, "encode", encode)

    async def main():
        add = asyncio.create_task(aengine.add_requests([NewRequest("gone", PROMPTS[0], SamplingParams(max_tokens=50))]))
        await wait_until(encode.started.is_set, "tokenization started")
        add.cancel()
        await asyncio.sleep(0.01)
        encode.release.set()
        with pytest.raises(asyncio.CancelledError):
            await add
        await wait_until(lambda: not engine.has_unfinished_requests() and aengine.num_in_flight == 0,
                         "the orphaned request is aborted")
        await aengine.between_steps(aengine.check_invariants)

    asyncio.run(main())


def test_overlong_prompts_are_rejected_before_tokenizing_or_copying(aengine, engine, monkeypatch):
    """Token ids past max_model_len, and text too long to fit whatever the tokenizer does with it
    (a sound bound: bytes / longest token's bytes), fail without the engine's processing."""
    def must_not_run(*args):
        raise AssertionError("the engine processed a prompt that could be rejected up front")

    monkeypatch.setattr(engine, "process", must_not_run)
    monkeypatch.setattr(engine.codec, "encode", must_not_run)
    max_len = engine.max_model_len

    async def main():
        with pytest.raises(ValueError, match=r"^prompt length must be <= max_model_len"):
            await aengine.add_requests([NewRequest("ids", {"prompt_token_ids": [5] * (max_len + 1)}, None)])
        with pytest.raises(ValueError, match=r"^prompt length must be <= max_model_len .* at least"):
            await aengine.add_requests([NewRequest("text", "ab" * (max_len * 64), None)])
        assert aengine.num_in_flight == 0

    asyncio.run(main())


@given(text=st.text(min_size=1, max_size=200) | st.from_regex(r"[ a-z<>/s]{1,200}", fullmatch=True))
def test_the_token_count_bound_never_exceeds_the_real_count(engine, text):
    """The cheap pre-check must never reject a prompt the tokenizer would have accepted."""
    bound = TokenCountBound(engine.codec.tokenizer)
    assert bound.longest, "the tiny model's byte-level BPE should get a bound"
    note(f"longest token: {bound.longest} bytes")
    assert bound.min_tokens(text) <= len(engine.codec.encode(text))


class _FakeTokenizer:
    """Only what TokenCountBound reads: the tokenizer.json spec."""

    def __init__(self, **spec):
        base = {"normalizer": None, "pre_tokenizer": {"type": "ByteLevel"}, "added_tokens": [],
                "model": {"type": "BPE", "vocab": {"a": 0, "abcd": 1}}}
        self.backend_tokenizer = type("Backend", (), {"to_str": lambda _self: json.dumps({**base, **spec})})()


@pytest.mark.parametrize("spec,longest", [
    ({}, 4),
    ({"added_tokens": [{"content": "<|long special|>", "lstrip": False, "rstrip": False}]}, 16),
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "behavior": "Isolated"}, {"type": "ByteLevel"}]}}, 4),
    ({"normalizer": {"type": "NFC"}}, None),  # NFC can shrink the text
    ({"pre_tokenizer": {"type": "Whitespace"}}, None),  # drops whitespace
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "behavior": "Removed"}, {"type": "ByteLevel"}]}}, None),
    ({"added_tokens": [{"content": "<mask>", "lstrip": True, "rstrip": False}]}, None),  # swallows spaces
    ({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}}, None),
])
def test_the_token_count_bound_exists_only_where_it_is_sound(spec, longest):
    bound = TokenCountBound(_FakeTokenizer(**spec))
    assert bound.longest == longest
    assert bound.min_tokens("x" * 40) == (-(-40 // longest) if longest else 0)
    assert TokenCountBound(None).min_tokens("x" * 40) == 0
