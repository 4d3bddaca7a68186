"""Continuous-batching scheduler with chunked prefill, prefix-cache admission and preemption.

Each `schedule()` fills a token budget (`max_num_batched_tokens`) with at most `max_num_seqs`
running requests:

1. running requests first, in admission order: each gets the rest of its uncomputed tokens
   (1 for a decode, a chunk of a prompt otherwise), capped by the remaining budget and by
   `long_prefill_token_threshold`. When the KV cache has no block for one, the scheduler
   preempts by recompute — under `fcfs` the latest admitted running request, under `priority`
   the lowest-priority one (largest `priority` value, ties: latest arrival) — frees its blocks,
   resets it to recompute, and puts it at the head of the waiting queue.
2. then, only if nothing was preempted this step, waiting requests in policy order: a
   prefix-cache lookup skips the cached tokens; the rest (chunked if needed) is allocated all or
   nothing; the first request that does not fit stops admission (no overtaking).

Invariants checked by `check_invariants()` after every step: scheduled tokens <= budget;
running <= max_num_seqs; no request both waiting and running; every running request holds KV
blocks covering its computed tokens; waiting requests hold none.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from fast.core.kv_cache_manager import KVCacheManager, PrefixHit
from fast.core.request import Request, Status

POLICIES = ("fcfs", "priority")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0  # 0: a chunk is capped by the budget only
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}): every running request needs at least one token per step"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) when chunked prefill is off: a whole prompt must fit one step"
            )
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def start(self) -> int:
        return self.request.num_computed_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queues
    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        self.waiting.append(request)

    def add_running(self, request: Request) -> bool:
        """Admit a forked sample that already holds blocks; False if the running set is full."""
        if len(self.running) >= self.config.max_num_seqs:
            return False
        request.status = Status.RUNNING
        self.running.append(request)
        return True

    def remove(self, request: Request) -> None:
        """Drop a finished or aborted request from the queues and free its blocks."""
        if request.status is Status.RUNNING:
            self.running.remove(request)
        elif request.status is Status.WAITING and request in self.waiting:
            self.waiting.remove(request)
        if self.kv.has_request(request.request_id):
            self.kv.free(request.request_id)
        request.status = Status.FINISHED

    def remove_all(self, requests: list[Request]) -> None:
        """`remove` for many requests (e.g. the samples of an aborted request) in one pass over
        each queue: O(queue + len(requests)), not O(queue × len(requests))."""
        doomed = {id(r) for r in requests}
        if not doomed:
            return
        self.running[:] = [r for r in self.running if id(r) not in doomed]
        kept = [r for r in self.waiting if id(r) not in doomed]
        self.waiting.clear()
        self.waiting.extend(kept)
        for request in requests:
            if self.kv.has_request(request.request_id):
                self.kv.free(request.request_id)
            request.status = Status.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _chunk(self, request: Request, budget: int) -> int:
        num_new = min(request.num_tokens - request.num_computed_tokens, budget)
        if self.config.long_prefill_token_threshold:
            num_new = min(num_new, self.config.long_prefill_token_threshold)
        return num_new

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        scheduled_ids: set[int] = set()
        for request in list(self.running):
            if budget <= 0:
                break
            if request.status is not Status.RUNNING:  # preempted earlier in this step
                continue
            num_new = self._chunk(request, budget)
            while not self.kv.allocate_slots(request.request_id, num_new):
                victim = self._pick_victim()
                if id(victim) in scheduled_ids:  # give back what it was granted this step
                    budget += self._unschedule(out, victim)
                    scheduled_ids.discard(id(victim))
                self._preempt(victim, out)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, num_new))
                scheduled_ids.add(id(request))
                budget -= num_new
        return budget

    def _unschedule(self, out: SchedulerOutput, victim: Request) -> int:
        for k, s in enumerate(out.scheduled):
            if s.request is victim:
                del out.scheduled[k]
                return s.num_new_tokens
        raise AssertionError("victim was not scheduled")

    def _pick_victim(self) -> Request:
        if self.config.policy == "priority":
            return max(self.running, key=lambda r: (r.priority, r.arrival))
        # The latest admitted: the running list's tail. Not the largest `arrival`: a forked sample
        # (n > 1) joins the running set after requests that arrived after its group.
        return self.running[-1]

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Preempt by recompute: free all blocks; it restarts from token 0 (prefix hits allowed)."""
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = Status.WAITING
        self.waiting.appendleft(request)  # each victim is prepended: the last one chosen is first
        self.num_preemptions += 1
        out.preempted.append(request)

    def _next_waiting(self) -> Request:
        if self.config.policy == "priority":
            return min(self.waiting, key=lambda r: (r.priority, r.arrival))
        return self.waiting[0]

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self._next_waiting()
            hit = self._lookup(request)
            num_remaining = request.num_tokens - hit.num_computed_tokens
            if not self.config.enable_chunked_prefill and num_remaining > budget:
                break
            num_new = min(num_remaining, budget)
            if self.config.long_prefill_token_threshold:
                num_new = min(num_new, self.config.long_prefill_token_threshold)
            if not self.kv.allocate_slots(request.request_id, num_new, hit):
                break
            self.waiting.remove(request)
            request.num_computed_tokens = hit.num_computed_tokens
            request.status = Status.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new

    def _lookup(self, request: Request) -> PrefixHit:
        """Prefix-cache hit for a waiting request; none when it wants prompt logprobs (those
        need the logits of every prompt position, so every prompt token is computed)."""
        if request.params.prompt_logprobs is not None:
            return PrefixHit((), (), 0)
        return self.kv.get_computed_blocks(request.token_ids)

    # ------------------------------------------------------------------ invariants
    def check_invariants(self, out: SchedulerOutput | None = None) -> None:
        cfg = self.config
        assert len(self.running) <= cfg.max_num_seqs, f"{len(self.running)} running > max_num_seqs {cfg.max_num_seqs}"
        running_ids = {id(r) for r in self.running}
        assert not running_ids & {id(r) for r in self.waiting}, "a request is both waiting and running"
        for r in self.running:
            assert r.status is Status.RUNNING
            assert self.kv.get_num_tokens(r.request_id) >= r.num_computed_tokens
        for r in self.waiting:
            assert r.status is Status.WAITING and not self.kv.has_request(r.request_id)
        if out is not None:
            assert out.num_scheduled_tokens <= cfg.max_num_batched_tokens, (
                out.num_scheduled_tokens, cfg.max_num_batched_tokens)
            assert len({id(s.request) for s in out.scheduled}) == len(out.scheduled), "scheduled twice"
            for s in out.scheduled:
                assert s.num_new_tokens >= 1 and id(s.request) in running_ids
        self.kv.check_invariants()
