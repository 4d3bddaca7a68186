"""The scheduling-policy hook (fast/core/policy.py): the built-ins choose as the scheduler did
before the hook, a user's policy steers a real engine, the scheduler refuses a choice outside the
queue, and the scheduler tier certifies a scheduler with a user's policy — and catches one that
ignores it, or a policy that livelocks."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
from hypothesis import Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from conformance.scheduler_machine import make_request, make_scheduler_machine, run_program
from examples.shortest_prompt_first import ShortestPromptFirst
from fast.config import EngineConfig, SchedulerConfig
from fast.core.kv_cache_manager import KVCacheConfig, KVCacheManager
from fast.core.policy import FCFS, Priority, SchedulingPolicy, load_policy, resolve_policy
from fast.core.scheduler import Scheduler
from ref.sampling_params import SamplingParams

SPF = "examples.shortest_prompt_first:ShortestPromptFirst"


def _queue(*specs):
    """Requests (id, prompt length, arrival, priority)."""
    return [make_request(rid, [1] * length, 4, arrival, priority) for rid, length, arrival, priority in specs]


# ----------------------------------------------------------------------------- the built-ins

def test_builtins_choose_as_the_scheduler_did_before_the_hook():
    # A forked sample (arrival 1) admitted after a later arrival (2): the latest admitted is the tail.
    running = _queue(("a", 5, 0, 1), ("c", 3, 2, 0), ("b#1", 5, 1, 2))
    waiting = _queue(("p", 9, 7, 2), ("d", 4, 3, 1), ("e", 2, 5, 1), ("f", 6, 4, 2))
    assert FCFS().next_waiting(waiting) is waiting[0]
    assert FCFS().pick_victim(running) is running[-1]
    # the expressions the scheduler held before the hook
    assert Priority().next_waiting(waiting) is min(waiting, key=lambda r: (r.priority, r.arrival))
    assert Priority().pick_victim(running) is max(running, key=lambda r: (r.priority, r.arrival))
    assert Priority().next_waiting(waiting).request_id == "d" and Priority().pick_victim(running).request_id == "b#1"


def test_resolve_policy_names_the_field():
    assert type(resolve_policy("fcfs")) is FCFS and type(resolve_policy("priority")) is Priority
    mine = ShortestPromptFirst()
    assert resolve_policy(mine) is mine
    for bad in ("lifo", 3, None, FCFS):  # FCFS: the class, not an instance
        with pytest.raises(ValueError, match=r"policy must be one of \('fcfs', 'priority'\) or a .*SchedulingPolicy"):
            resolve_policy(bad)


def test_configs_take_a_policy_object_and_reject_anything_else(tiny_model_dir):
    mine = ShortestPromptFirst()
    assert EngineConfig(model=tiny_model_dir, max_model_len=64, policy=mine).resolve().scheduler.policy is mine
    assert SchedulerConfig(4, 64, 64, policy=mine).policy is mine
    with pytest.raises(ValueError, match="policy"):
        EngineConfig(model=tiny_model_dir, policy=object())
    with pytest.raises(ValueError, match="policy"):
        SchedulerConfig(4, 64, 64, policy="shortest")


def test_workers_are_not_sent_the_policy(tiny_model_dir):
    """A policy class defined in a function does not pickle; workers never get the scheduler config."""
    class Local(FCFS):
        pass

    resolved = EngineConfig(model=tiny_model_dir, max_model_len=64, policy=Local()).resolve()
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(resolved)
    sent = pickle.loads(pickle.dumps(resolved.for_workers()))
    assert sent.scheduler is None and sent.model.max_model_len == 64


@pytest.mark.parametrize("spec, match", [
    ("no_such_module_xyz:P", "cannot import 'no_such_module_xyz'"),
    ("examples.shortest_prompt_first:Missing", "module 'examples.shortest_prompt_first' has no 'Missing'"),
    ("examples.shortest_prompt_first:Request", "is a type, not a SchedulingPolicy"),
    ("fast.core.policy:SchedulingPolicy", "failed"),  # abstract: cannot be made
    ("lifo", "policy must be one of"),
])
def test_load_policy_says_what_is_wrong(spec, match):
    with pytest.raises(ValueError, match=match):
        load_policy(spec)


def test_load_policy_takes_a_class_or_an_instance():
    assert isinstance(load_policy(SPF), ShortestPromptFirst)
    assert type(load_policy("priority")) is Priority


# ----------------------------------------------------------------------------- the scheduler

class _Stranger(SchedulingPolicy):
    """Breaks the contract: admits a request that is not in the queue."""

    name = "stranger"

    def next_waiting(self, waiting):
        return make_request("ghost", [1, 2], 4, 99, 0)

    def pick_victim(self, running):
        return running[-1]


def test_a_choice_outside_the_queue_is_refused():
    scheduler = Scheduler(SchedulerConfig(4, 64, 64, policy=_Stranger()), KVCacheManager(KVCacheConfig(16, 4, True)))
    scheduler.add(make_request("0", [1, 2, 3], 4, 0, 0))
    with pytest.raises(ValueError, match=r"stranger.*next_waiting\(\) returned .* not one of the requests it was "
                                         r"given \['0'\]"):
        scheduler.schedule()


def _first_admitted(model_dir: str, policy) -> list[str]:
    """Request ids in the order they first appear in a step's outputs, one running at a time."""
    from fast import LLMEngine

    engine = LLMEngine(EngineConfig(model=model_dir, max_model_len=64, block_size=8, max_num_seqs=1, policy=policy))
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    engine.add_request("long", {"prompt_token_ids": list(range(3, 33))}, params)
    engine.add_request("short", {"prompt_token_ids": [5, 6, 7]}, params)
    seen: list[str] = []
    while engine.has_unfinished_requests():
        seen += [out.request_id for out in engine.step() if out.request_id not in seen]
    return seen


def test_a_custom_policy_changes_the_admission_order(tiny_model_dir):
    assert _first_admitted(tiny_model_dir, "fcfs") == ["long", "short"]
    assert _first_admitted(tiny_model_dir, ShortestPromptFirst()) == ["short", "long"]


def test_the_conformance_adapter_imports_a_policy_named_as_a_string(tiny_model_dir):
    from conformance.adapters import FastAdapter

    engine = FastAdapter(tiny_model_dir, max_model_len=64).make_engine(policy=SPF)
    assert isinstance(engine.scheduler.policy, ShortestPromptFirst)


# ----------------------------------------------------------------------------- the scheduler tier

# Drawn runs, for this test file's budget: the ci profile's examples, 40 steps each.
TestSchedulerObeysShortestPromptFirst = make_scheduler_machine(
    Scheduler, "ShortestPromptFirstMachine", policies=[ShortestPromptFirst()]).TestCase
TestSchedulerObeysShortestPromptFirst.settings = settings(settings(), stateful_step_count=40)


def _fcfs_only(config: SchedulerConfig, kv: KVCacheManager) -> Scheduler:
    """A planted bug: a scheduler that honours "fcfs"/"priority" but runs fcfs for a policy object."""
    return Scheduler(config if isinstance(config.policy, str) else dataclasses.replace(config, policy="fcfs"), kv)


def test_a_scheduler_that_ignores_the_policy_is_caught():
    machine = make_scheduler_machine(_fcfs_only, "IgnoresThePolicy", policies=[ShortestPromptFirst()])
    quick = settings(max_examples=50, stateful_step_count=40, deadline=None, database=None, derandomize=True,
                     phases=[Phase.generate])
    with pytest.raises(AssertionError, match=r"shortest-prompt-first; .*\(policy order .*the policy schedules"):
        run_state_machine_as_test(machine, settings=quick)


def test_the_model_keeps_its_own_builtins_so_a_bug_in_fasts_is_caught(monkeypatch):
    """The machine's model follows SPEC §10's fcfs and priority written in conformance/, not
    fast's classes: a bug planted in fast's Priority is not the model's too."""
    from tests.planting import plant

    config = dict(block_size=2, extra_blocks=0, max_num_seqs=4, budget_extra=0, chunked=True, threshold=0,
                  policy="priority", caching=False)
    program = [("add", 36, 13, 0), ("add", 16, 16, 0), ("step", 2), ("add", 23, 11, 0), ("step", 2), ("step", 4)]
    run_program(config, program)
    plant(monkeypatch, "fast.core.policy", "return max(running, key=lambda r: (r.priority, r.arrival))",
          "return max(running, key=lambda r: r.priority)")  # equal priorities: no tie-break by arrival
    with pytest.raises(AssertionError, match=r"preempted \['0'\], the policy preempts \['2'\]"):
        run_program(config, program)


class _MostComputedVictim(FCFS):
    """Preempts the running request with the most computed tokens: the victim loses the most work."""

    name = "most-computed-victim"

    def pick_victim(self, running):
        return max(running, key=lambda r: (r.num_computed_tokens, r.arrival))


def test_a_livelocking_policy_is_reported():
    """Two requests that do not fit the pool together: each preemption resets the one further
    ahead, so neither ever finishes (832 preemptions each in 5000 steps, when this was written)."""
    config = dict(block_size=2, extra_blocks=0, max_num_seqs=2, budget_extra=40, chunked=True, threshold=8,
                  policy=_MostComputedVictim(), caching=False)
    with pytest.raises(AssertionError, match=r"most-computed-victim: unfinished after \d+ steps .*the scheduler "
                                             r"followed the policy .* at every step"):
        run_program(config, [("add", 30, 20, 0), ("add", 30, 20, 0)])


def test_the_same_program_finishes_under_the_example_policy():
    config = dict(block_size=2, extra_blocks=0, max_num_seqs=2, budget_extra=40, chunked=True, threshold=8,
                  policy=ShortestPromptFirst(), caching=False)
    run_program(config, [("add", 30, 20, 0), ("add", 30, 20, 0), ("add", 5, 3, 0), ("step", 4)])


# ----------------------------------------------------------------------------- the CLI

def fcfs_only_adapter(model_dir, **options):
    """`--engine tests.test_policy:fcfs_only_adapter`: fast with the planted `_fcfs_only` scheduler."""
    from conformance.adapters import FastAdapter

    class FcfsOnly(FastAdapter):
        name = "fast-fcfs-only"
        scheduler_factory = staticmethod(_fcfs_only)

    return FcfsOnly(model_dir, **options)


def test_cli_rejects_a_bad_policy_before_anything_runs(capsys):
    from conformance.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--tier", "scheduler", "--policy", "examples.shortest_prompt_first:Nope"])
    assert exit_info.value.code == 2
    assert "argument --policy" in capsys.readouterr().err


def test_cli_catches_a_scheduler_that_ignores_the_policy_across_the_process_boundary(capsys):
    """The policy object crosses to the engine process by value (imported there by name)."""
    from conformance.__main__ import main

    code = main(["--engine", "tests.test_policy:fcfs_only_adapter", "--tier", "scheduler", "--policy", SPF,
                 "--no-shrink"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "the policy schedules" in out and "shortest-prompt-first" in out
    assert f"--policy {SPF}" in out  # the replay line repeats it
