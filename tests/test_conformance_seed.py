"""`python -m conformance --seed N` reaches every check, the state machines included: two runs
with the same seed do the same thing, another seed does something else, and no seed is the
derandomized run (the same every time)."""

from __future__ import annotations

import re
from types import SimpleNamespace

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from conformance.runner import run_check
from conformance.tiers import CHECKS, Check, Context, Profile

PROFILE = Profile("seeded", examples=4, max_requests=1, stateful_steps=10, families=False, kernel_max_seq_len=8)


def _context(adapter=None) -> Context:
    return Context(adapter=adapter, model_dir="", profile=PROFILE, make_adapter=None)


def _toy_trace(seed: int | None) -> list[int]:
    """What a stateful check's rules drew, run through the runner as the CLI runs it."""
    trace: list[int] = []

    class Toy(RuleBasedStateMachine):
        @rule(x=st.integers(0, 10**9))
        def draw(self, x):
            trace.append(x)

    result = run_check(Check("scheduler", "toy", lambda ctx: ([Toy], None), stateful=True), _context(),
                       seed=seed, shrink=False, replay="")
    assert result.status == "passed", result.message
    return trace


def test_a_stateful_check_follows_the_seed():
    assert _toy_trace(5) == _toy_trace(5)
    assert _toy_trace(5) != _toy_trace(6)
    assert _toy_trace(None) == _toy_trace(None)


def _recording_scheduler(trace: list):
    """fast's scheduler, recording the configuration of each run and every plan schedule() makes."""
    from fast.core.scheduler import Scheduler

    def factory(config, kv):
        scheduler = Scheduler(config, kv)
        trace.append(repr(config))
        schedule = scheduler.schedule

        def recorded():
            out = schedule()
            trace.append(re.sub(r" at 0x[0-9a-f]+", "", repr(out)))  # the plan, object addresses aside
            return out

        scheduler.schedule = recorded
        return scheduler

    return factory


def _tier_run(tier: str, seed: int) -> tuple[list, dict]:
    from fast.core.kv_cache_manager import KVCacheManager

    trace: list = []
    adapter = SimpleNamespace(scheduler_factory=_recording_scheduler(trace), allocator_factory=KVCacheManager)
    check = next(c for c in CHECKS if c.tier == tier and c.name == "state_machine")
    result = run_check(check, _context(adapter), seed=seed, shrink=False, replay="")
    assert result.status == "passed", result.message
    return trace, result.coverage


def test_the_scheduler_tier_follows_the_seed():
    first, _ = _tier_run("scheduler", 11)
    assert first and first == _tier_run("scheduler", 11)[0]
    assert first != _tier_run("scheduler", 12)[0]


def test_the_allocator_tier_follows_the_seed():
    """The allocator's events over the random runs (its coverage counts) repeat with the seed."""
    _, first = _tier_run("allocator", 11)
    assert first and first == _tier_run("allocator", 11)[1]
