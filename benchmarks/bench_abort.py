"""Cost of aborting a request with many samples (`n`), per sample.

Aborting a queued request of n samples must be O(n): the hardening issue measured a quadratic
abort (0.09 s at n = 5k, 4.85 s at n = 40k) that let one client stall a server. Each benchmark
records `seconds_per_sample` when timing is on; compare the two sizes of one run — a flat
figure means linear. Cases: before the samples fork (all wait on sample 0's prompt), and
after a step in which they forked (they sit in the scheduler's queues).
"""

from __future__ import annotations

import pytest

from fast import EngineConfig, LLMEngine, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig.from_options(tiny_model_dir, {
        "max_model_len": 64, "max_n": 8192, "max_num_seqs": 32, "num_kv_blocks": 64, "block_size": 8}))


@pytest.mark.parametrize("stage", ["queued", "forked"])
@pytest.mark.parametrize("n", [1024, 8192])
def test_abort_large_n(benchmark, engine, n, stage):
    params = SamplingParams(n=n, temperature=1.0, seed=0, max_tokens=4, ignore_eos=True)

    def setup():
        engine.add_request("big", {"prompt_token_ids": [1, 2, 3, 4]}, params)
        if stage == "forked":
            engine.step()  # prefill sample 0; the others fork (32 run, the rest wait)
        return (), {}

    benchmark.pedantic(lambda: engine.abort_request("big"), setup=setup, rounds=3, iterations=1)
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_free_blocks == engine.num_blocks
    benchmark.extra_info["n"] = n
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["seconds_per_sample"] = benchmark.stats.stats.mean / n
