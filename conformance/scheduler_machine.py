"""A Hypothesis state machine for a continuous-batching scheduler, against an executable policy.

Shipped in the package so any scheduler with the same small surface (`add`, `add_running`,
`schedule`, `remove`, `running`, `waiting`, `has_work`, `check_invariants`) can be checked. Tokens
are "generated" by the machine itself (no model), so thousands of steps run in seconds.

`SchedulerModel` is SPEC §10 written as plainly as possible: two Python lists for the queues and
`AllocatorModel` (conformance/allocator.py) for the KV cache, so it predicts every step exactly.
The machine sends every operation to both and checks, after every step:
- the same requests preempted, in the same order (which victim: fcfs the latest admitted, priority
  the largest `(priority, arrival)`; a victim granted tokens this step gives them back);
- the same requests scheduled, in the same order, with the same token counts (running first in
  admission order, then admissions in policy order: fcfs queue order, priority smallest
  `(priority, arrival)`, ties by arrival; no overtaking; nothing admitted in a step that preempted;
  chunks capped by the budget and `long_prefill_token_threshold`; prefix hits skipped for
  `prompt_logprobs`);
- the same running list (admission order) and waiting queue (fcfs: the exact order, so where a
  preempted request re-enters is checked; priority: the same set), the same computed tokens,
  block tables and free-block order;
- forks of n > 1 samples join the running set only below `max_num_seqs` (`add_running`);
- the scheduler's own `check_invariants()`.
At teardown, with no new work, every request must finish within the liveness bound of
`liveness_bound` (SPEC §10) and every block must come back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conformance.allocator import AllocatorModel
from fast.core.kv_cache_manager import KVCacheConfig, KVCacheManager
from fast.core.request import Request, RequestGroup, Status
from fast.core.scheduler import Scheduler, SchedulerConfig
from ref.sampling_params import SamplingParams
from ref.sequence import Sequence, StopContext
from ref.tokenizer import TextCodec

MAX_MODEL_LEN = 64
STOP_CTX = StopContext(eos_token_ids=(), max_model_len=MAX_MODEL_LEN, codec=TextCodec(None))


def make_group(rid: str, prompt: list[int], max_tokens: int, arrival: int, priority: int, n: int = 1,
               prompt_logprobs: int | None = None) -> RequestGroup:
    """A user request of `n` samples as the engine builds it: sample i has arrival `arrival + i`;
    samples 1..n-1 wait in `pending_forks` until sample 0's prompt is computed."""
    if n == 1:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=prompt_logprobs)
    else:  # greedy requires n = 1; the machine never samples, so any seed will do
        params = SamplingParams(n=n, seed=0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=prompt_logprobs)
    group = RequestGroup(rid, None, prompt, params, STOP_CTX)
    for i in range(n):
        sid = rid if i == 0 else f"{rid}#{i}"
        group.samples.append(Request(sid, group, Sequence(i, params.for_sample(i), None), list(prompt),
                                     arrival=arrival + i, priority=priority))
    group.pending_forks = group.samples[1:]
    return group


def make_request(rid: str, prompt: list[int], max_tokens: int, arrival: int, priority: int) -> Request:
    """A single-sample request (kept for callers of the earlier machine)."""
    return make_group(rid, prompt, max_tokens, arrival, priority).samples[0]


@dataclass
class ModelStep:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)


class SchedulerModel:
    """SPEC §10 as the simplest executable policy. It holds the real `Request` objects only as
    handles (reading their tokens, priority, arrival and params) and keeps its own queues,
    computed-token counts and KV model, so nothing the scheduler under test does leaks in."""

    def __init__(self, config: SchedulerConfig, kv_config: KVCacheConfig):
        self.config = config
        self.kv = AllocatorModel(kv_config)
        self.waiting: list[Request] = []  # fcfs: queue order (head first)
        self.running: list[Request] = []  # admission order
        self.computed: dict[int, int] = {}  # id(request) -> computed tokens

    # ---- queues
    def add(self, r: Request) -> None:
        self.waiting.append(r)

    def add_running(self, r: Request) -> bool:
        if len(self.running) >= self.config.max_num_seqs:
            return False
        self.running.append(r)
        return True

    def remove(self, r: Request) -> None:
        if r in self.running:
            self.running.remove(r)
        if r in self.waiting:
            self.waiting.remove(r)
        if r.request_id in self.kv.requests:
            self.kv.release(r.request_id)

    # ---- the policy
    def policy_order(self) -> list[Request]:
        """Waiting requests in the order they must be admitted."""
        if self.config.policy == "priority":
            return sorted(self.waiting, key=lambda r: (r.priority, r.arrival))
        return list(self.waiting)

    def victim(self) -> Request:
        if self.config.policy == "priority":
            return max(self.running, key=lambda r: (r.priority, r.arrival))
        return self.running[-1]  # the latest admitted

    def chunk(self, remaining: int, budget: int) -> int:
        num = min(remaining, budget)
        return min(num, self.config.long_prefill_token_threshold) if self.config.long_prefill_token_threshold else num

    def preempt(self, r: Request, step: ModelStep) -> None:
        """Free everything, recompute from 0, re-enter at the head of the waiting queue (each
        victim is prepended as it is chosen, so the last one chosen is first)."""
        self.running.remove(r)
        self.kv.release(r.request_id)
        self.computed[id(r)] = 0
        self.waiting.insert(0, r)
        step.preempted.append(r)

    def schedule(self) -> ModelStep:
        step = ModelStep()
        budget = self.config.max_num_batched_tokens
        granted: dict[int, int] = {}
        for r in list(self.running):
            if budget <= 0:
                break
            if r not in self.running:  # preempted earlier in this step
                continue
            num = self.chunk(r.num_tokens - self.computed[id(r)], budget)
            while not self.kv.grow(r.request_id, num):
                v = self.victim()
                if id(v) in granted:
                    budget += granted.pop(id(v))
                    step.scheduled = [(s, k) for s, k in step.scheduled if s is not v]
                self.preempt(v, step)
                if v is r:
                    break
            else:
                step.scheduled.append((r, num))
                granted[id(r)] = num
                budget -= num
        if step.preempted:
            return step
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            r = self.policy_order()[0]
            tokens = list(r.token_ids)
            hit = [] if r.params.prompt_logprobs is not None else self.kv.lookup(tokens, None)
            remaining = len(tokens) - len(hit) * self.kv.bs
            if not self.config.enable_chunked_prefill and remaining > budget:
                break
            num = self.chunk(remaining, budget)
            if not self.kv.add(r.request_id, tokens, None, hit, num):
                break
            self.waiting.remove(r)
            self.running.append(r)
            self.computed[id(r)] = len(hit) * self.kv.bs
            step.scheduled.append((r, num))
            budget -= num
        return step

    def advance(self, r: Request, num: int) -> None:
        """The scheduled tokens are computed (call before a new token is appended)."""
        self.computed[id(r)] += num
        self.kv.requests[r.request_id].tokens = list(r.token_ids)
        self.kv.compute(r.request_id)


def liveness_bound(policy: str, samples: list[Request]) -> int:
    """Steps within which every unfinished sample must finish once nothing new arrives.

    Each sample needs at most L = prompt + max_tokens tokens computed (a recompute included:
    its generated tokens replace the ones it still may generate), at >= 1 token a step.
    fcfs: the head of running ++ waiting is never preempted unless it runs alone (and alone it
    fits: the pool holds one max_model_len request), is scheduled first every step and is
    admitted in the first step it waits with nothing running; nothing ever moves ahead of it.
    So heads finish one after the other: sum(L + 1) steps.
    priority: the smallest (priority, arrival) is likewise never a victim, but may wait while the
    running set (which only shrinks, apart from forks) finishes: each head's turn costs at most
    sum(L + 1), so len(samples) * sum(L + 1).
    """
    total = sum(len(s.group.prompt_token_ids) + s.params.max_tokens + 1 for s in samples)
    return total if policy == "fcfs" else max(1, len(samples)) * total


def _ids(requests) -> list[str]:
    return [r.request_id for r in requests]


def _short(ids: list[str], limit: int = 10) -> str:
    """A queue for a failure message: its first `limit` ids and how many more."""
    more = f" +{len(ids) - limit} more" if len(ids) > limit else ""
    return f"{ids[:limit]}{more}"


class SchedulerMachine(RuleBasedStateMachine):
    """Random adds (n samples), steps and aborts against `SchedulerModel`; a final drain proves liveness."""

    factory = Scheduler  # (SchedulerConfig, KVCacheManager) -> scheduler under test
    # Configuration spaces; each run draws one, then a configuration from it.
    SETUPS: tuple[dict, ...] = ()  # set below the class: (GENERAL_SETUP, PRESSURE_SETUP)

    @initialize(data=st.data())
    def setup(self, data):
        """Draw a configuration: pool, budget, max_num_seqs, chunking, policy, prefix caching."""
        space = data.draw(st.sampled_from(self.SETUPS), label="configuration space")
        self._setup(**{name: data.draw(strategy, label=name) for name, strategy in space.items()})

    def _setup(self, block_size, extra_blocks, max_num_seqs, budget_extra, chunked, threshold, policy, caching):
        num_blocks = -(-MAX_MODEL_LEN // block_size) + extra_blocks
        budget = max_num_seqs + budget_extra
        if not chunked:
            budget = max(budget, MAX_MODEL_LEN)
        self.config = SchedulerConfig(max_num_seqs, budget, MAX_MODEL_LEN, chunked, threshold, policy)
        kv_config = KVCacheConfig(num_blocks, block_size, caching)
        self.kv = KVCacheManager(kv_config)
        self.scheduler = type(self).factory(self.config, self.kv)
        self.model = SchedulerModel(self.config, kv_config)
        self.groups: dict[str, RequestGroup] = {}  # unfinished user requests
        self.next_id = 0
        self.arrivals = 0
        self.steps = 0
        self.healthy = True
        note(f"config={self.config} num_blocks={num_blocks}")

    # ---- rules
    @rule(length=st.integers(1, 40), data=st.data(), max_tokens=st.integers(1, 20), priority=st.integers(0, 2),
          n=st.sampled_from([1, 1, 1, 2, 3]), prompt_logprobs=st.sampled_from([None] * 5 + [1]))
    def add(self, length, data, max_tokens, priority, n, prompt_logprobs):
        """Queue a request of n samples (small alphabet: prefixes collide; priorities tie)."""
        # The length is drawn first, uniformly: Hypothesis' own lists are mostly short.
        prompt = data.draw(st.lists(st.integers(0, 2), min_size=length, max_size=length), label="prompt")
        rid = str(self.next_id)
        max_tokens = max(1, min(max_tokens, MAX_MODEL_LEN - len(prompt) + 1))
        group = make_group(rid, prompt, max_tokens, self.arrivals, priority, n, prompt_logprobs)
        self.next_id += 1
        self.arrivals += n
        self.groups[rid] = group
        self.scheduler.add(group.samples[0])
        self.model.add(group.samples[0])
        note(f"add {rid} len={len(prompt)} max_tokens={max_tokens} prio={priority} n={n} "
             f"prompt_logprobs={prompt_logprobs}")

    @precondition(lambda self: self.groups)
    @rule(data=st.data())
    def abort(self, data):
        """Abort a live request: every sample leaves every queue and frees its blocks."""
        rid = data.draw(st.sampled_from(sorted(self.groups)))
        group = self.groups.pop(rid)
        for sample in group.samples:
            if sample.finished or sample in group.pending_forks:
                continue
            sample.seq.finish("abort")
            self.scheduler.remove(sample)
            self.model.remove(sample)
        group.pending_forks = []
        note(f"abort {rid}")

    @rule(token=st.integers(0, 2), steps=st.sampled_from([1, 1, 2, 4]))
    def step(self, token, steps):
        """A few schedules + the engine's bookkeeping, with `token` as every sampled token."""
        for _ in range(steps):
            self._step(token)
            self.queues_match_model()
            self.kv_matches_model()

    # ---- one step, checked against the model
    def _step(self, token: int) -> int:
        self.healthy = False  # until this step's checks pass (teardown must not mask a failure)
        self.steps += 1
        before = f"running {_short(_ids(self.model.running))}, waiting {_short(_ids(self.model.waiting))}"
        if self.config.policy == "priority":
            before += f" (policy order {_short(_ids(self.model.policy_order()))})"
        expected = self.model.schedule()
        out = self.scheduler.schedule()
        self.scheduler.check_invariants(out)
        where = f"step {self.steps} ({self.config.policy}; before it {before})"
        got_pre, want_pre = _ids(out.preempted), _ids(expected.preempted)
        assert got_pre == want_pre, f"{where}: preempted {got_pre}, the policy preempts {want_pre}"
        got = [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]
        want = [(r.request_id, k) for r, k in expected.scheduled]
        assert got == want, f"{where}: scheduled {got}, the policy schedules {want}"
        note(f"step {self.steps}: scheduled={got} preempted={got_pre}")
        self._advance(out, token)
        self.healthy = True
        return len(out.scheduled)

    def _advance(self, out, token: int) -> None:
        ready = []
        for s in out.scheduled:
            r = s.request
            self.model.advance(r, s.num_new_tokens)
            r.num_computed_tokens += s.num_new_tokens
            self.kv.cache_full_blocks(r.request_id, r.token_ids, r.num_computed_tokens)
            if r.num_computed_tokens == r.num_tokens:
                ready.append(r)
                if r.seq.index == 0 and r.group.pending_forks and not r.seq.output_ids:
                    ready += self._fork(r)
        for r in ready:
            r.append_token(token)
            if r.finished:
                self.scheduler.remove(r)
                self.model.remove(r)
                if r.group.finished:
                    self.groups.pop(r.group.request_id, None)

    def _fork(self, parent: Request) -> list[Request]:
        """The engine's fork of samples 1..n-1 once sample 0's prompt is computed: a child shares
        the parent's blocks and runs if the running set has room; else it queues to recompute."""
        forked = []
        for child in parent.group.pending_forks:
            copies = self.kv.fork(parent.request_id, child.request_id)
            want_copies = self.model.kv.fork(parent.request_id, child.request_id)
            got_copies = None if copies is None else [tuple(c) for c in copies]
            assert got_copies == want_copies, (
                f"fork {child.request_id}: copies {got_copies}, the policy's KV model {want_copies}")
            if copies is not None:
                ok = self.scheduler.add_running(child)
                want = self.model.add_running(child)
                assert ok == want, (
                    f"add_running({child.request_id}) returned {ok} with {len(self.model.running)} running "
                    f"and max_num_seqs {self.config.max_num_seqs}; the policy returns {want}")
                if ok:
                    child.num_computed_tokens = parent.num_computed_tokens
                    self.model.computed[id(child)] = self.model.computed[id(parent)]
                    forked.append(child)
                    continue
                self.kv.free(child.request_id)
                self.model.kv.release(child.request_id)
            self.scheduler.add(child)
            self.model.add(child)
        note(f"fork {parent.request_id}: running {_ids(forked)}, queued "
             f"{_ids(c for c in parent.group.pending_forks if c not in forked)}")
        parent.group.pending_forks = []
        return forked

    # ---- invariants
    @invariant()
    def queues_match_model(self):
        if not hasattr(self, "scheduler"):
            return
        self.healthy = False
        running, want_running = _ids(self.scheduler.running), _ids(self.model.running)
        assert running == want_running, (
            f"running {_short(running)} (admission order), the policy has {_short(want_running)}")
        waiting, want_waiting = _ids(self.scheduler.waiting), _ids(self.model.waiting)
        if self.config.policy == "fcfs":
            assert waiting == want_waiting, (
                f"waiting queue {_short(waiting)}, the policy has {_short(want_waiting)} (preempted requests "
                f"re-enter at the head, the last chosen first)")
        else:
            assert sorted(waiting) == sorted(want_waiting), (
                f"waiting {_short(waiting)}, the policy has {_short(want_waiting)}")
        for r in self.scheduler.running:
            assert r.status is Status.RUNNING and r.group.request_id in self.groups
            want = self.model.computed[id(r)]
            assert r.num_computed_tokens == want, (
                f"{r.request_id}: {r.num_computed_tokens} computed, the policy has {want}")
        self.healthy = True

    @invariant()
    def kv_matches_model(self):
        if not hasattr(self, "scheduler"):
            return
        self.healthy = False
        self.kv.check_invariants()
        for rid, req in self.model.kv.requests.items():
            table = self.kv.get_block_table(rid) if self.kv.has_request(rid) else None
            assert table == req.table, f"{rid}: block table {table}, the policy's KV model {req.table}"
        held = [rid for rid in (r.request_id for r in self.scheduler.waiting) if self.kv.has_request(rid)]
        assert not held, f"waiting requests {held} hold KV blocks"
        free = self.kv.free_block_ids()
        assert free == self.model.kv.free, f"free blocks {free}, the policy's KV model {self.model.kv.free}"
        self.healthy = True

    def teardown(self):
        """Liveness: with no new work, everything finishes within the bound and every block comes back."""
        if not getattr(self, "healthy", False):  # not set up, or a check already failed: report that one
            return
        samples = [s for g in self.groups.values() for s in g.samples if not s.finished]
        bound = liveness_bound(self.config.policy, samples)
        steps = 0
        while self.scheduler.has_work():
            assert self._step(1) > 0, "scheduler stalled: work queued but nothing scheduled"
            self.queues_match_model()
            steps += 1
            assert steps <= bound, (
                f"{self.config.policy}: unfinished after {bound} steps with no new work (starvation or "
                f"livelock): running {_short(_ids(self.scheduler.running))}, "
                f"waiting {_short(_ids(self.scheduler.waiting))}")
        assert not self.groups, f"requests {sorted(self.groups)} never finished"
        assert self.kv.num_free_blocks == self.kv.config.num_blocks, "blocks leaked after every request finished"
        self.kv.check_invariants()


GENERAL_SETUP = dict(
    block_size=st.sampled_from([2, 4, 8]),
    extra_blocks=st.sampled_from([0, 0, 1, 2, 4, 8, 24]),  # the smallest legal pool often
    max_num_seqs=st.integers(1, 6),
    budget_extra=st.integers(0, 40),
    chunked=st.booleans(),
    threshold=st.sampled_from([0, 0, 3, 16]),
    policy=st.sampled_from(["fcfs", "priority"]),
    caching=st.booleans(),
)
# Memory pressure: two-token blocks in the smallest pools and long prefill chunks, so a chunk
# needs several blocks and one step often preempts two or more requests (and, under priority,
# one already granted tokens this step).
PRESSURE_SETUP = {
    **GENERAL_SETUP,
    "block_size": st.just(2),
    "extra_blocks": st.sampled_from([0, 1, 2]),
    "max_num_seqs": st.integers(3, 6),
    "budget_extra": st.sampled_from([0, 2, 8, 40]),  # a binding budget: a refund changes the step
    "chunked": st.just(True),
    "threshold": st.sampled_from([0, 8, 16]),
}
SchedulerMachine.SETUPS = (GENERAL_SETUP, PRESSURE_SETUP)


def make_scheduler_machine(factory, name: str = "SchedulerMachine",
                           setup: dict | None = None) -> type[SchedulerMachine]:
    """A `SchedulerMachine` for another scheduler implementation; use its `.TestCase`.
    `setup` replaces some of the configuration strategies (see `GENERAL_SETUP`); by default a run
    draws from the general space or the memory-pressure one."""
    attrs = {"factory": staticmethod(factory)}
    if setup is not None:
        attrs["SETUPS"] = ({**GENERAL_SETUP, **setup},)
    return type(name, (SchedulerMachine,), attrs)
