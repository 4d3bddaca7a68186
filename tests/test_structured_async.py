"""A slow constraint compile must not stall the engine: the async front compiles beside the loop,
one compile at a time, and rejects a compile that does not finish in time."""

from __future__ import annotations

import asyncio

import pytest

import fast.engine.async_llm_engine as async_mod
from fast import LLMEngine, SamplingParams
from fast.config import EngineConfig
from fast.engine.async_llm_engine import AsyncLLMEngine, NewRequest
from ref.sampling_params import StructuredOutputsParams as SO

# ~1-5 s to compile with the tiny vocabulary (the cost grows ~cubically with the optional count).
SLOW_GRAMMAR = "root ::= " + " ".join('"a"?' for _ in range(700))


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig.from_options(tiny_model_dir, dict(max_num_seqs=4, max_model_len=128,
                                                                    block_size=8, num_kv_blocks=64)))


def test_engine_steps_while_a_grammar_compiles(engine):
    async def run():
        front = AsyncLLMEngine(engine)
        plain = asyncio.ensure_future(_collect(front, "plain", SamplingParams(temperature=0, max_tokens=24)))
        await asyncio.sleep(0)  # the plain request is queued first
        slow = SamplingParams(temperature=0, max_tokens=4, structured_outputs=SO(grammar=SLOW_GRAMMAR))
        stream = await front.add_requests([NewRequest("slow", "Hi", slow)])  # returns once compiled
        plain_was_done = plain.done()
        async with stream:
            async for _ in stream:
                pass
        await plain
        await front.shutdown()
        return plain_was_done

    # Not a speed bound: an ordering. The 24 steps of the unconstrained request all ran while the
    # grammar compiled (with the compile under the engine's lock, none could).
    assert asyncio.run(run())


def test_a_compile_past_the_deadline_is_rejected_and_changes_nothing(engine, monkeypatch):
    monkeypatch.setattr(async_mod, "COMPILE_TIMEOUT_S", 0.01)

    async def run():
        front = AsyncLLMEngine(engine)
        so = SO(grammar=SLOW_GRAMMAR + ' "b"')  # not cached by the other test
        with pytest.raises(ValueError, match=r"structured_outputs\.grammar cannot be compiled within"):
            await front.add_requests([NewRequest("x", "Hi", SamplingParams(structured_outputs=so))])
        out = await _collect(front, "after", SamplingParams(temperature=0, max_tokens=3))
        await front.shutdown()
        return out

    assert asyncio.run(run()).finished
    assert not engine.has_unfinished_requests()


async def _collect(front: AsyncLLMEngine, rid: str, params: SamplingParams):
    last = None
    async for out in front.generate("Once upon a time", params, rid):
        last = out
    return last
