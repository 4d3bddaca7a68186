"""Continuous-batching scheduler with chunked prefill, prefix-cache admission and preemption.

Each `schedule()` fills a token budget (`max_num_batched_tokens`) with at most `max_num_seqs`
running requests:

1. running requests first, in admission order: each gets the rest of its uncomputed tokens
   (1 for a decode, a chunk of a prompt otherwise), capped by the remaining budget and by
   `long_prefill_token_threshold`. When the KV cache has no block for one, the scheduler
   preempts by recompute the running request its policy picks (`fast/core/policy.py`: under
   `fcfs` the latest admitted, under `priority` the lowest-priority one, ties: latest arrival),
   frees its blocks, resets it to recompute, and puts it at the head of the waiting queue.
2. then, only if nothing was preempted this step, waiting requests in policy order: a
   prefix-cache lookup skips the cached tokens; the rest (chunked if needed) is allocated all or
   nothing; the first request that does not fit stops admission (no overtaking).

3. then the n > 1 forks: when sample 0's chunk completes its prompt, samples 1..n-1 join the
   running set sharing its blocks (the partial last block is copied) and sample from its row in
   this very step; a fork that finds no free block or a full running set queues to recompute.

`schedule()` returns plain data (`fast/core/outputs.py`) for the executor; after the workers ran
it, `update_from_output()` applies the result: computed tokens, full blocks into the prefix cache,
sampled tokens and the stop rules, freeing what finished.

Invariants checked by `check_invariants()` after every step: scheduled tokens <= budget;
running <= max_num_seqs; no request both waiting and running; every running request holds KV
blocks covering its computed tokens; waiting requests hold none.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from fast.config import SchedulerConfig
from fast.core.detokenizer import cached_token_text
from fast.core.kv_cache_manager import BlockCopy, KVCacheManager, PrefixHit
from fast.core.outputs import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput
from fast.core.policy import checked_choice, resolve_policy
from fast.core.request import Request, RequestGroup, SampleId, Status
from ref.outputs import Logprob

@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def start(self) -> int:
        return self.request.num_computed_tokens


@dataclass
class _Plan:
    """The step being built: live requests, before they are turned into `SchedulerOutput`."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    preempted_for: list[Request] = field(default_factory=list)  # whose allocation failed, per victim
    forked: list[tuple[Request, Request]] = field(default_factory=list)  # (parent, child)
    block_copies: list[BlockCopy] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.policy = resolve_policy(config.policy)  # whom to admit next, whom to preempt
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[SampleId, Request] = {}  # every queued or running sample
        self.num_preemptions = 0
        self.num_generated_tokens = 0
        self.num_prompt_tokens_computed = 0
        self._finished_req_ids: list[SampleId] = []  # for the workers, with the next step

    # ------------------------------------------------------------------ queues
    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        self.waiting.append(request)
        self.requests[request.request_id] = request

    def add_running(self, request: Request) -> bool:
        """Admit a forked sample that already holds blocks; False if the running set is full."""
        if len(self.running) >= self.config.max_num_seqs:
            return False
        request.status = Status.RUNNING
        self.running.append(request)
        self.requests[request.request_id] = request
        return True

    def remove(self, request: Request) -> None:
        """Drop a finished or aborted request from the queues and free its blocks."""
        if request.status is Status.RUNNING:
            self.running.remove(request)
        elif request.status is Status.WAITING and request in self.waiting:
            self.waiting.remove(request)
        self._forget(request)

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
            self._forget(request)

    def _forget(self, request: Request) -> None:
        if self.kv.has_request(request.request_id):
            self.kv.free(request.request_id)
        if self.requests.get(request.request_id) is request:
            del self.requests[request.request_id]
        if request.known_to_workers:
            self._finished_req_ids.append(request.request_id)
            request.known_to_workers = False
        request.status = Status.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def pending_finished_req_ids(self) -> tuple[SampleId, ...]:
        """Finished samples the workers still hold: they learn it with the next step that runs."""
        return tuple(self._finished_req_ids)

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> SchedulerOutput:
        plan = _Plan()
        budget = self._schedule_running(plan, self.config.max_num_batched_tokens)
        if not plan.preempted:
            self._schedule_waiting(plan, budget)
        self._fork(plan)  # last: nothing else allocates after the forks in this step
        return self._to_output(plan)

    def _chunk(self, request: Request, budget: int) -> int:
        num_new = min(request.num_tokens - request.num_computed_tokens, budget)
        if self.config.long_prefill_token_threshold:
            num_new = min(num_new, self.config.long_prefill_token_threshold)
        return num_new

    def _schedule_running(self, plan: _Plan, budget: int) -> int:
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
                    budget += self._unschedule(plan, victim)
                    scheduled_ids.discard(id(victim))
                self._preempt(victim, plan, needed_by=request)
                if victim is request:
                    break
            else:
                plan.scheduled.append(ScheduledRequest(request, num_new))
                scheduled_ids.add(id(request))
                budget -= num_new
        return budget

    def _unschedule(self, plan: _Plan, victim: Request) -> int:
        for k, s in enumerate(plan.scheduled):
            if s.request is victim:
                del plan.scheduled[k]
                return s.num_new_tokens
        raise AssertionError("victim was not scheduled")

    def _pick_victim(self) -> Request:
        return checked_choice(self.policy, "pick_victim", self.running)

    def _preempt(self, request: Request, plan: _Plan, needed_by: Request) -> None:
        """Preempt by recompute: free all blocks; it restarts from token 0 (prefix hits allowed)."""
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_synced_blocks = 0  # the workers' table is void; it gets a whole new one
        request.num_preemptions += 1
        request.status = Status.WAITING
        self.waiting.appendleft(request)  # each victim is prepended: the last one chosen is first
        self.num_preemptions += 1
        plan.preempted.append(request)
        plan.preempted_for.append(needed_by)

    def _next_waiting(self) -> Request:
        return checked_choice(self.policy, "next_waiting", self.waiting)

    def _schedule_waiting(self, plan: _Plan, budget: int) -> None:
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
            request.prefix_hit = None
            request.num_computed_tokens = hit.num_computed_tokens
            request.status = Status.RUNNING
            self.running.append(request)
            plan.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new

    def _lookup(self, request: Request) -> PrefixHit:
        """Prefix-cache hit for a waiting request; none when it wants prompt logprobs (those
        need the logits of every prompt position, so every prompt token is computed)."""
        if request.params.prompt_logprobs is not None:
            return PrefixHit((), (), 0)
        # A request that waits is looked up at every step: resume from its last hit.
        request.prefix_hit = self.kv.get_computed_blocks(request.token_ids, since=request.prefix_hit)
        return request.prefix_hit

    def _fork(self, plan: _Plan) -> None:
        """Samples 1..n-1 of a group whose sample 0 completes its prompt in this step: each shares
        sample 0's blocks (a copy of the partial last one) and runs if the running set has room;
        otherwise it queues to compute the prompt itself."""
        for s in list(plan.scheduled):
            parent = s.request
            group = parent.group
            if parent.index != 0 or not group.pending_forks or parent.num_output_tokens:
                continue
            if s.start + s.num_new_tokens < parent.num_tokens:
                continue  # a chunk that does not reach the prompt's end samples nothing yet
            for child in group.pending_forks:
                copies = self.kv.fork(parent.request_id, child.request_id)
                if copies is not None and self.add_running(child):
                    child.num_computed_tokens = s.start + s.num_new_tokens
                    plan.block_copies += copies
                    plan.forked.append((parent, child))
                    continue
                if copies is not None:
                    self.kv.free(child.request_id)
                self.add(child)
            group.pending_forks = []

    # ------------------------------------------------------------------ the step's plain data
    def _to_output(self, plan: _Plan) -> SchedulerOutput:
        out = SchedulerOutput(
            preempted_req_ids=[r.request_id for r in plan.preempted],
            preempted_for=[r.request_id for r in plan.preempted_for],
            block_copies=plan.block_copies,
        )
        for s in plan.scheduled:
            r = s.request
            out.num_scheduled_tokens[r.request_id] = s.num_new_tokens
            if r.known_to_workers:
                out.scheduled_cached_reqs.append(self._cached_data(r))
            else:
                out.scheduled_new_reqs.append(self._new_data(r))
        for parent, child in plan.forked:
            out.forked_reqs.append(self._new_data(child, fork_of=parent.request_id))
        out.structured_req_ids = [r.request_id for r in self._samplers(plan) if r.grammar is not None]
        if not out.is_empty:  # else the finished ids wait for a step that reaches the workers
            out.finished_req_ids, self._finished_req_ids = self._finished_req_ids, []
        return out

    @staticmethod
    def _samplers(plan: _Plan) -> list[Request]:
        """The samples that sample this step: those whose chunk reaches the end of their tokens,
        and the samples forked in this step (they sample from their parent's row)."""
        done = [s.request for s in plan.scheduled if s.start + s.num_new_tokens == s.request.num_tokens]
        return done + [child for _, child in plan.forked]

    def _new_data(self, r: Request, fork_of: SampleId | None = None) -> NewRequestData:
        table = self.kv.get_block_table(r.request_id)
        r.known_to_workers, r.num_synced_tokens, r.num_synced_blocks = True, r.num_tokens, len(table)
        # Prompt logprobs belong to the group: sample 0 computes them (a fork never does).
        prompt_logprobs = r.params.prompt_logprobs if r.index == 0 else None
        return NewRequestData(r.request_id, list(r.token_ids), r.num_prompt_tokens, r.params, r.seed, table,
                              r.num_computed_tokens, prompt_logprobs, fork_of, r.group.bad_words_token_ids)

    def _cached_data(self, r: Request) -> CachedRequestData:
        # Only the blocks added since the last sync: a decode step costs O(1), not O(context).
        new_blocks = self.kv.get_block_table(r.request_id, start=r.num_synced_blocks)
        resumed = r.num_synced_blocks == 0
        data = CachedRequestData(r.request_id, r.token_ids[r.num_synced_tokens:], new_blocks,
                                 r.num_computed_tokens, resumed)
        r.num_synced_tokens, r.num_synced_blocks = r.num_tokens, r.num_synced_blocks + len(new_blocks)
        return data

    # ------------------------------------------------------------------ after the step ran
    def update_from_output(self, out: SchedulerOutput, runner_output: ModelRunnerOutput) -> list[RequestGroup]:
        """Apply one executed step: advance computed tokens, cache newly full blocks, record
        prompt logprobs, append sampled tokens under the stop rules, free finished samples.
        Returns the user requests that changed, in batch order."""
        touched: dict[str, RequestGroup] = {}
        for req_id, num_new in out.num_scheduled_tokens.items():
            r = self.requests.get(req_id)
            if r is None or r.status is not Status.RUNNING:  # aborted while the step ran
                continue
            start = r.num_computed_tokens
            if r.index == 0 and r.params.prompt_logprobs is not None:
                _add_prompt_logprobs(r.group, runner_output.prompt_logprobs.get(req_id, []))
            self.num_prompt_tokens_computed += max(0, min(start + num_new, r.num_prompt_tokens) - start)
            r.num_computed_tokens += num_new
            self.kv.cache_full_blocks(r.request_id, r.token_ids, r.num_computed_tokens)
            touched[r.group.request_id] = r.group
        now = time.perf_counter()
        for req_id, token, entry in zip(runner_output.req_ids, runner_output.sampled_token_ids,
                                        runner_output.logprobs):
            r = self.requests.get(req_id)
            if r is None or r.finished:
                continue
            group = r.group
            touched[group.request_id] = group
            if token < 0:  # SPEC §5 rule 0: the masks left nothing to sample
                r.finish("stop")
                self._finish_sampled(r, now)
                continue
            if entry is not None:
                r.logprobs.append(_with_text(entry, r.group))
                r.cumulative_logprob += entry[token].logprob
            r.append_token(token)
            self.num_generated_tokens += 1
            if group.first_token_time is None:
                group.first_token_time = now
            if r.finished:
                self._finish_sampled(r, now)
        return list(touched.values())

    def _finish_sampled(self, r: Request, now: float) -> None:
        self.remove(r)
        if r.group.finished:
            r.group.finish_time = now

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
            assert out.total_num_scheduled_tokens <= cfg.max_num_batched_tokens, (
                out.total_num_scheduled_tokens, cfg.max_num_batched_tokens)
            running = {r.request_id for r in self.running}
            for req_id, num_new in out.num_scheduled_tokens.items():
                assert num_new >= 1, f"{req_id!r} scheduled with {num_new} tokens (at least 1)"
                assert req_id in running, f"{req_id!r} scheduled but not running"
        self.kv.check_invariants()


def _with_text(entry: dict[int, Logprob], group: RequestGroup) -> dict[int, Logprob]:
    """A worker's logprobs entry with each token's decoded text (workers hold no tokenizer)."""
    token_text = cached_token_text(group.stop_ctx.codec)
    return {t: Logprob(lp.logprob, lp.rank, token_text(t)) for t, lp in entry.items()}


def _add_prompt_logprobs(group: RequestGroup, entries: list[dict[int, Logprob]]) -> None:
    if group.prompt_logprobs is None:
        group.prompt_logprobs = [None]  # nothing predicts the first prompt token
    group.prompt_logprobs += [_with_text(e, group) for e in entries]
