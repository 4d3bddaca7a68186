"""Scheduler step cost without a model: how much CPU time planning one step takes.

Drives `fast.core.scheduler.Scheduler` over a real `KVCacheManager` with 64 requests decoding
(and a stream of prefills): schedule() and update_from_output() with the ModelRunnerOutput a
worker would return (token 1 for every sample that completes), as in the state machine.
"""

from __future__ import annotations

import pytest

from conformance.scheduler_machine import make_request
from fast.core.kv_cache_manager import KVCacheConfig, KVCacheManager
from fast.core.outputs import ModelRunnerOutput
from fast.core.scheduler import Scheduler, SchedulerConfig


def _scheduler(num_requests: int, prompt_len: int) -> Scheduler:
    kv = KVCacheManager(KVCacheConfig(num_blocks=4096, block_size=16))
    s = Scheduler(SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=4096, max_model_len=64), kv)
    for i in range(num_requests):
        s.add(make_request(str(i), [i % 7] * prompt_len, 20, i, 0))
    return s


def _step(s: Scheduler) -> int:
    out = s.schedule()
    sampling = [rid for rid, n in out.num_scheduled_tokens.items()
                if s.requests[rid].num_computed_tokens + n == s.requests[rid].num_tokens]
    s.update_from_output(out, ModelRunnerOutput(sampling, [1] * len(sampling), [None] * len(sampling)))
    return len(out.num_scheduled_tokens)


@pytest.mark.parametrize("num_requests", [16, 64])
def test_scheduler_step(benchmark, num_requests):
    def setup():
        s = _scheduler(num_requests, 40)
        _step(s)  # everyone prefilled: the timed steps are decodes
        return (s,), {}

    scheduled = benchmark.pedantic(_step, setup=setup, rounds=50, iterations=1)
    assert scheduled == num_requests
    benchmark.extra_info["requests_per_step"] = num_requests
