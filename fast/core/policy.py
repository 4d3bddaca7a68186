"""Scheduling policies: whom the scheduler admits next, and whom it preempts.

The scheduler (`fast/core/scheduler.py`) owns everything else — the token budget, chunking,
`max_num_seqs`, the KV cache, prefix hits, forks — and asks its policy two questions:

    next_waiting(waiting) -> the request to admit next. The scheduler admits in this order
        with no overtaking: when the chosen request does not fit (budget, KV blocks, running
        set), admission stops for this step. Asked again after each admission.
    pick_victim(running)  -> the request to preempt when a running request needs a KV block
        and none is free. `running` is in admission order and includes the request that needs
        the block (choosing it preempts it itself). Asked again until the block is found.

A policy is plain code that a user may write (`examples/shortest_prompt_first.py`); the built-in
ones are `FCFS` and `Priority`, named "fcfs" and "priority" in `EngineConfig.policy`.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fast.core.request import Request

BUILTIN_POLICIES = ("fcfs", "priority")  # fast.config.POLICIES: the names a string may give


class SchedulingPolicy(ABC):
    """The contract of a scheduling policy.

    - Deterministic and pure: the choice depends only on the queue given and on the request
      fields below; a policy must not mutate the queue or any request, nor keep state that
      changes its later choices. (The conformance suite's scheduler tier asks it again for its
      own model of the queues: a policy that is not pure is likely to fail there.)
    - It returns one of the requests of the queue it was given, never another object: the
      scheduler checks this and raises `ValueError` naming the policy otherwise. The queue is
      never empty.
    - It may read these `Request` fields: `request_id`, `arrival` (an engine-wide counter in
      arrival order; samples of one request arrive one after the other), `priority` (lower is
      more urgent), `num_tokens` (prompt + generated so far), `num_prompt_tokens`,
      `num_computed_tokens` (0 for every waiting request: a preempted request recomputes),
      `num_output_tokens`, `num_preemptions`. Anything else is the scheduler's business.
    - The waiting queue is in the order requests were queued: a new request at the tail (so are
      samples 1..n-1 of a request that find the running set full when sample 0's prompt is
      computed), a preempted request at the head (each victim is prepended as it is chosen, so
      the last one chosen is first); so "the head of the queue" (`FCFS`) resumes preempted
      requests before admitting new ones.

    Liveness is the policy's responsibility: the scheduler follows its choices exactly, so a
    policy whose victims keep losing their progress can livelock the engine (the scheduler tier
    reports that). Preempting the latest admitted request (`running[-1]`) is always live: the
    oldest running request is then never preempted unless it runs alone, and alone it fits.
    """

    name: str = "custom"

    @abstractmethod
    def next_waiting(self, waiting: Sequence[Request]) -> Request:
        """The waiting request to admit next (`waiting` is non-empty, head first)."""

    @abstractmethod
    def pick_victim(self, running: Sequence[Request]) -> Request:
        """The running request to preempt (`running` is non-empty, in admission order)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class FCFS(SchedulingPolicy):
    """First come, first served: admit the head of the waiting queue (preempted requests first);
    preempt the latest admitted running request — the tail of the running list, not the largest
    `arrival` (a forked sample of n > 1 joins the running set after requests that arrived later)."""

    name = "fcfs"

    def next_waiting(self, waiting: Sequence[Request]) -> Request:
        return waiting[0]

    def pick_victim(self, running: Sequence[Request]) -> Request:
        return running[-1]


class Priority(SchedulingPolicy):
    """Smallest `priority` value first, ties by arrival; preempt the largest `(priority,
    arrival)`: the least urgent, and among equals the latest to arrive."""

    name = "priority"

    def next_waiting(self, waiting: Sequence[Request]) -> Request:
        return min(waiting, key=lambda r: (r.priority, r.arrival))

    def pick_victim(self, running: Sequence[Request]) -> Request:
        return max(running, key=lambda r: (r.priority, r.arrival))


def resolve_policy(policy: str | SchedulingPolicy) -> SchedulingPolicy:
    """A built-in name ("fcfs", "priority") -> that policy; a `SchedulingPolicy` -> itself;
    anything else -> ValueError naming the field `policy` and what it accepts."""
    if isinstance(policy, SchedulingPolicy):
        return policy
    if isinstance(policy, str) and policy in BUILTIN_POLICIES:
        return FCFS() if policy == "fcfs" else Priority()
    raise ValueError(f"policy must be one of {BUILTIN_POLICIES} or a fast.core.policy.SchedulingPolicy "
                     f"instance, got {policy!r}")


def load_policy(spec: str) -> SchedulingPolicy:
    """A policy named on a command line (`python -m conformance --policy`): a built-in name, or
    `module:attr` naming a `SchedulingPolicy` instance or a `SchedulingPolicy` class that takes no
    arguments (imported here). Raises ValueError saying what is wrong with `spec`."""
    if ":" not in spec:
        return resolve_policy(spec)
    module_name, attr = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"policy {spec!r}: cannot import {module_name!r} ({err}); "
                         f"run from the directory that holds it, or put it on PYTHONPATH") from None
    if not hasattr(module, attr):
        raise ValueError(f"policy {spec!r}: module {module_name!r} has no {attr!r}")
    obj = getattr(module, attr)
    if isinstance(obj, type) and issubclass(obj, SchedulingPolicy):
        try:
            obj = obj()
        except TypeError as err:
            raise ValueError(f"policy {spec!r}: {module_name}.{attr}() failed ({err}); name a class that "
                             f"takes no arguments, or an instance") from None
    if not isinstance(obj, SchedulingPolicy):
        raise ValueError(f"policy {spec!r}: {module_name}.{attr} is a {type(obj).__name__}, not a "
                         f"SchedulingPolicy instance or subclass (fast.core.policy)")
    return obj


def checked_choice(policy: SchedulingPolicy, method: str, queue: Sequence[Request]) -> Request:
    """`policy.<method>(queue)`, checked to be one of the queue's requests (by identity)."""
    chosen = getattr(policy, method)(queue)
    # The ends first: the built-ins choose there, and a queue may be long (thousands waiting).
    if chosen is not queue[0] and chosen is not queue[-1] and not any(chosen is r for r in queue):
        ids = [r.request_id for r in queue]
        shown = f"{ids[:10]}" + (f" +{len(ids) - 10} more" if len(ids) > 10 else "")
        raise ValueError(f"scheduling policy {policy!r}: {method}() returned {chosen!r:.200}, which is not one of "
                         f"the requests it was given {shown}; a policy must return a request of the queue")
    return chosen
