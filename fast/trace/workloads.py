"""Small named workloads for `python -m fast.trace`: each shows one mechanism of the engine.

    offline          12 requests at once, prompts of 8-60 tokens: chunked prefills, a full batch
    shared-prefix    10 requests sharing a 40-token prefix, arriving over time: prefix-cache hits
    preemption       6 long requests in a 24-block pool: preemption by recompute
    parallel         3 requests with n=3: forks that share their parent's blocks

A workload is plain data: prompts as token ids (any checkpoint with a vocabulary of >= 512 tokens
takes them), one SamplingParams each, the engine step at which each request arrives, and the
engine options it is meant for (the CLI's flags override them). Every prompt is drawn from a
seeded generator and every request is greedy or seeded: a workload is the same on every run.
All of them finish in a few seconds on 2 CPU cores with the embedded tiny model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ref.sampling_params import SamplingParams

TOKEN_RANGE = (3, 500)  # ids drawn for prompts: above the tiny model's special tokens (0-2)
MAX_STEPS = 20_000  # a workload that has not finished by then is a bug, not a slow run


@dataclass(frozen=True)
class Workload:
    """Requests and when they arrive. `arrivals[i]` is the engine step (counted from 0 by
    `replay`) before which request i is added; `options` are the engine options it suits."""

    name: str
    description: str
    prompts: list[dict[str, list[int]]]
    params: list[SamplingParams]
    arrivals: list[int]
    options: dict[str, Any] = field(default_factory=dict)
    priorities: list[int] | None = None  # per request (lower = more urgent); used by policy "priority"

    def __post_init__(self) -> None:
        if not len(self.prompts) == len(self.params) == len(self.arrivals):
            raise ValueError(f"workload {self.name!r}: prompts, params and arrivals differ in length "
                             f"({len(self.prompts)}, {len(self.params)}, {len(self.arrivals)})")
        if self.priorities is not None and len(self.priorities) != len(self.prompts):
            raise ValueError(f"workload {self.name!r}: {len(self.priorities)} priorities for {len(self.prompts)} requests")

    @property
    def max_n(self) -> int:
        return max(p.n for p in self.params)

    def reservations(self, max_model_len: int) -> list[int]:
        """KV slots each request's sample needs at most: prompt + max_tokens, capped (what ref
        reserves per row up front)."""
        return [min(len(pr["prompt_token_ids"]) + (p.max_tokens or max_model_len), max_model_len)
                for pr, p in zip(self.prompts, self.params)]


class Steppable(Protocol):
    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    priority: int = 0) -> None: ...
    def has_unfinished_requests(self) -> bool: ...


def replay(workload: Workload, engine: Steppable, step: Callable[[], list] | None = None) -> int:
    """Add each request at its arrival step and step the engine until all finished; request i
    gets id str(i). `step` replaces `engine.step` (e.g. a `RefObserver`'s). Returns the number
    of steps taken. An idle engine jumps to the next arrival (no empty steps)."""
    step = engine.step if step is None else step
    pending = sorted(range(len(workload.prompts)), key=lambda i: (workload.arrivals[i], i))
    clock = 0
    while pending or engine.has_unfinished_requests():
        if not engine.has_unfinished_requests():
            clock = max(clock, workload.arrivals[pending[0]])
        while pending and workload.arrivals[pending[0]] <= clock:
            i = pending.pop(0)
            priority = 0 if workload.priorities is None else workload.priorities[i]
            engine.add_request(str(i), workload.prompts[i], workload.params[i], priority=priority)
        step()
        clock += 1
        if clock > MAX_STEPS:
            raise RuntimeError(f"workload {workload.name!r} did not finish in {MAX_STEPS} steps")
    return clock


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(*TOKEN_RANGE) for _ in range(n)]


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def offline() -> Workload:
    rng = random.Random(1)
    lengths = [rng.randrange(8, 61) for _ in range(12)]
    return Workload(
        "offline", "12 requests at once, prompts of 8-60 tokens, greedy: chunked prefills under a 32-token budget",
        prompts=[{"prompt_token_ids": _tokens(rng, n)} for n in lengths],
        params=[_greedy(rng.randrange(8, 33)) for _ in lengths],
        arrivals=[0] * len(lengths),
        # 4 samples x ceil((60 + 32) / 4) = 92 blocks at most: no preemption
        options=dict(block_size=4, num_kv_blocks=96, max_num_batched_tokens=32, max_num_seqs=4, max_model_len=128),
    )


def shared_prefix() -> Workload:
    rng = random.Random(2)
    prefix = _tokens(rng, 40)  # 10 full blocks of 4: all of them cacheable
    n = 10
    return Workload(
        "shared-prefix", "10 requests sharing a 40-token prefix (a system prompt), one arriving every 3 steps: "
                         "after the first, each finds the prefix's blocks in the cache",
        prompts=[{"prompt_token_ids": prefix + _tokens(rng, rng.randrange(4, 17))} for _ in range(n)],
        params=[_greedy(rng.randrange(6, 13)) for _ in range(n)],
        arrivals=[3 * i for i in range(n)],
        options=dict(block_size=4, num_kv_blocks=64, max_num_batched_tokens=32, max_num_seqs=4, max_model_len=128),
    )


def preemption() -> Workload:
    rng = random.Random(3)
    n = 6
    return Workload(
        "preemption", "6 requests of ~50 tokens each in a 24-block pool (96 slots): running samples outgrow "
                      "the pool and the policy's victim is preempted, to be recomputed later",
        prompts=[{"prompt_token_ids": _tokens(rng, rng.randrange(14, 23))} for _ in range(n)],
        params=[_greedy(rng.randrange(24, 33)) for _ in range(n)],
        arrivals=[0] * n,
        options=dict(block_size=4, num_kv_blocks=24, max_num_batched_tokens=32, max_num_seqs=4, max_model_len=64),
        priorities=[n - i for i in range(n)],  # later requests more urgent: --policy priority reorders
    )


def parallel() -> Workload:
    rng = random.Random(4)
    n = 3
    return Workload(
        "parallel", "3 requests with n=3 samples (seeded, temperature 0.8), prompts of 22 tokens: "
                    "samples 1-2 fork from sample 0, sharing its full blocks (the partial one is copied)",
        prompts=[{"prompt_token_ids": _tokens(rng, 22)} for _ in range(n)],
        params=[SamplingParams(n=3, temperature=0.8, seed=10 + i, max_tokens=10, ignore_eos=True) for i in range(n)],
        arrivals=[0, 2, 4],
        options=dict(block_size=4, num_kv_blocks=48, max_num_batched_tokens=32, max_num_seqs=9, max_model_len=64),
    )


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "offline": offline,
    "shared-prefix": shared_prefix,
    "preemption": preemption,
    "parallel": parallel,
}


def get_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got {name!r}")
    return WORKLOADS[name]()
