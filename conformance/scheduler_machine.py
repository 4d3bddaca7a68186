"""A Hypothesis state machine for a continuous-batching scheduler, against an executable policy.

Shipped in the package so any scheduler with the same small surface (`add`, `schedule`,
`update_from_output`, `remove`, `running`, `waiting`, `has_work`, `check_invariants`) can be
checked. Tokens are "generated" by the machine itself (no model): it hands `update_from_output` the
`ModelRunnerOutput` a correct worker would return for the policy's plan, so thousands of steps run
in seconds.

`SchedulerModel` is SPEC §10 written as plainly as possible: two Python lists for the queues and
`AllocatorModel` (conformance/allocator.py) for the KV cache, so it predicts every step exactly.
The policy — whom to admit next, whom to preempt — is the config's: "fcfs" or "priority" (drawn),
which the model implements itself (`SpecFCFS`, `SpecPriority`: SPEC §10, not fast's own classes,
so that a bug in those is not the model's too), or a user's `SchedulingPolicy` object
(`make_scheduler_machine(..., policies=...)`, `python -m conformance --policy`), which the model
asks itself, on the model's own queues: the machine checks that the scheduler OBEYS the policy,
whatever it is (not that the policy is good).

The machine sends every operation to both and checks, after every step:
- the same requests preempted, in the same order (the policy's victim, asked again until a block
  is free: fcfs the latest admitted, priority the largest `(priority, arrival)`; a victim granted
  tokens this step gives them back);
- the same requests scheduled, in the same order, with the same token counts (running first in
  admission order, then admissions in policy order: fcfs queue order, priority smallest
  `(priority, arrival)`, ties by arrival; no overtaking; nothing admitted in a step that preempted;
  chunks capped by the budget and `long_prefill_token_threshold`; prefix hits skipped for
  `prompt_logprobs`);
- the same running list (admission order) and waiting queue in the same order (the order a policy
  is shown: where a preempted request re-enters is checked), the same computed tokens, block
  tables and free-block order;
- forks of n > 1 samples (in the step sample 0 completes its prompt, after all other
  allocations) join the running set only below `max_num_seqs`, with the same block copies;
- the scheduler's own `check_invariants()`.
At teardown, with no new work, every request must finish within the liveness bound of
`liveness_bound` (SPEC §10) and every block must come back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import note
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conformance.allocator import AllocatorModel
from fast.core.kv_cache_manager import KVCacheConfig, KVCacheManager
from fast.core.outputs import ModelRunnerOutput
from fast.core.policy import FCFS, Priority, SchedulingPolicy
from fast.core.request import Request, RequestGroup, Status
from fast.core.scheduler import Scheduler, SchedulerConfig
from ref.sampling_params import SamplingParams
from ref.sequence import StopContext
from ref.tokenizer import TextCodec

MAX_MODEL_LEN = 64


def _note(message: str) -> None:
    """Hypothesis' note inside a test; nothing in a scripted scenario run outside one."""
    if currently_in_test_context():
        note(message)
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
        group.samples.append(Request(sid, group, i, params.for_sample(i), None, list(prompt),
                                     arrival=arrival + i, priority=priority))
    group.pending_forks = group.samples[1:]
    return group


def make_request(rid: str, prompt: list[int], max_tokens: int, arrival: int, priority: int) -> Request:
    """A single-sample request (kept for callers of the earlier machine)."""
    return make_group(rid, prompt, max_tokens, arrival, priority).samples[0]


class SpecFCFS:
    """SPEC §10's fcfs: admit the head of the waiting queue; preempt the latest admitted."""

    name = "fcfs"

    def next_waiting(self, waiting: list[Request]) -> Request:
        return waiting[0]

    def pick_victim(self, running: list[Request]) -> Request:
        return running[-1]


class SpecPriority:
    """SPEC §10's priority: admit the smallest `(priority, arrival)`; preempt the largest."""

    name = "priority"

    def next_waiting(self, waiting: list[Request]) -> Request:
        return min(waiting, key=lambda r: (r.priority, r.arrival))

    def pick_victim(self, running: list[Request]) -> Request:
        return max(running, key=lambda r: (r.priority, r.arrival))


def model_policy(policy: str | SchedulingPolicy):
    """What the model follows: its own fcfs or priority for a built-in (named, or fast's object of
    exactly that class), else the user's policy object itself (the definition of its own order)."""
    if policy == "fcfs" or type(policy) is FCFS:
        return SpecFCFS()
    if policy == "priority" or type(policy) is Priority:
        return SpecPriority()
    if not isinstance(policy, SchedulingPolicy):
        raise ValueError(f"policy must be 'fcfs', 'priority' or a SchedulingPolicy, got {policy!r}")
    return policy


@dataclass
class ModelStep:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    forked: list[tuple[Request, Request]] = field(default_factory=list)  # (parent, child) running
    block_copies: list[tuple[int, int]] = field(default_factory=list)


class SchedulerModel:
    """SPEC §10 as the simplest executable policy. It holds the real `Request` objects only as
    handles (reading their tokens, priority, arrival and params) and keeps its own queues,
    computed-token counts and KV model, so nothing the scheduler under test does leaks in."""

    def __init__(self, config: SchedulerConfig, kv_config: KVCacheConfig):
        self.config = config
        self.policy = model_policy(config.policy)
        self.kv = AllocatorModel(kv_config)
        self.waiting: list[Request] = []  # queue order (head first), as a policy sees it
        self.running: list[Request] = []  # admission order
        self.computed: dict[int, int] = {}  # id(request) -> computed tokens
        self.pending_forks: dict[int, list[Request]] = {}  # id(group) -> samples 1..n-1 not forked

    # ---- queues
    def add(self, r: Request) -> None:
        self.waiting.append(r)
        if r.index == 0 and r.num_output_tokens == 0 and id(r.group) not in self.pending_forks:
            self.pending_forks[id(r.group)] = list(r.group.samples[1:])

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
        if r.index == 0:
            self.pending_forks.pop(id(r.group), None)

    # ---- the policy
    def ask(self, method: str, queue: list[Request]) -> Request:
        """The policy's choice from one of the model's queues; one not in it is the policy's bug."""
        chosen = getattr(self.policy, method)(queue)
        assert any(chosen is r for r in queue), (
            f"the policy {self.policy!r} broke its contract: {method}() returned {chosen!r:.200}, not one of "
            f"the requests it was given {_short(_ids(queue))}")
        return chosen

    def policy_order(self) -> list[Request]:
        """Waiting requests in the order they would be admitted were there room for all."""
        rest, order = list(self.waiting), []
        while rest:
            order.append(self.ask("next_waiting", rest))
            rest.remove(order[-1])
        return order

    def victim(self) -> Request:
        return self.ask("pick_victim", self.running)

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
        while not step.preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            r = self.ask("next_waiting", self.waiting)
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
        self.fork(step)
        return step

    def fork(self, step: ModelStep) -> None:
        """Last in a step: sample 0 completing its prompt forks samples 1..n-1; each shares its
        blocks and runs below max_num_seqs, else queues at the tail to compute its prompt."""
        for parent, num in list(step.scheduled):
            children = self.pending_forks.pop(id(parent.group), None)
            if not children or parent.index != 0 or self.computed[id(parent)] + num < parent.num_tokens:
                if children:
                    self.pending_forks[id(parent.group)] = children
                continue
            for child in children:
                copies = self.kv.fork(parent.request_id, child.request_id)
                if copies is not None and self.add_running(child):
                    self.computed[id(child)] = self.computed[id(parent)] + num
                    step.forked.append((parent, child))
                    step.block_copies += copies
                    continue
                if copies is not None:
                    self.kv.release(child.request_id)
                self.add(child)

    def advance(self, r: Request, num: int) -> None:
        """The scheduled tokens are computed (call before a new token is appended)."""
        self.computed[id(r)] += num
        self.kv.requests[r.request_id].tokens = list(r.token_ids)
        self.kv.compute(r.request_id)


def liveness_bound(policy: str | SchedulingPolicy, samples: list[Request]) -> int:
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
    Any other policy: no bound holds for every deterministic policy (one whose victims keep losing
    their progress can livelock the engine), so it gets priority's, which is generous; a policy
    that preempts the latest admitted (`running[-1]`) needs only fcfs's, whatever it admits (the
    argument above never used the admission order).
    """
    total = sum(len(s.group.prompt_token_ids) + s.params.max_tokens + 1 for s in samples)
    fcfs = policy == "fcfs" or type(policy) in (FCFS, SpecFCFS)
    return total if fcfs else max(1, len(samples)) * total


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
        _note(f"config={self.config} num_blocks={num_blocks}")

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
        _note(f"add {rid} len={len(prompt)} max_tokens={max_tokens} prio={priority} n={n} "
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
            sample.finish("abort")
            self.scheduler.remove(sample)
            self.model.remove(sample)
        group.pending_forks = []
        _note(f"abort {rid}")

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
        if type(self.model.policy) is not SpecFCFS:  # fcfs admits in queue order
            before += f" (policy order {_short(_ids(self.model.policy_order()))})"
        expected = self.model.schedule()
        out = self.scheduler.schedule()
        self.scheduler.check_invariants(out)
        where = f"step {self.steps} ({self.model.policy.name}; before it {before})"
        got_pre, want_pre = list(out.preempted_req_ids), _ids(expected.preempted)
        assert got_pre == want_pre, f"{where}: preempted {got_pre}, the policy preempts {want_pre}"
        got = list(out.num_scheduled_tokens.items())
        want = [(r.request_id, k) for r, k in expected.scheduled]
        assert got == want, f"{where}: scheduled {got}, the policy schedules {want}"
        got_forks = [(d.fork_of, d.req_id) for d in out.forked_reqs]
        want_forks = [(p.request_id, c.request_id) for p, c in expected.forked]
        assert got_forks == want_forks, f"{where}: forked {got_forks} into the running set, the policy {want_forks}"
        got_copies = [tuple(c) for c in out.block_copies]
        assert got_copies == expected.block_copies, (
            f"{where}: fork block copies {got_copies}, the policy's KV model {expected.block_copies}")
        _note(f"step {self.steps}: scheduled={got} preempted={got_pre} forked={got_forks}")
        self._advance(expected, out, token)
        self.healthy = True
        return len(out.num_scheduled_tokens)

    def _advance(self, expected: ModelStep, out, token: int) -> None:
        """What a correct worker returns for the policy's plan: `token` for every sample whose
        computed tokens reach its end, and for the samples forked from it."""
        sampled = []
        for r, num in expected.scheduled:
            self.model.advance(r, num)
            if self.model.computed[id(r)] == r.num_tokens:
                sampled.append(r)
                sampled += [c for p, c in expected.forked if p is r]
        for _, child in expected.forked:
            self.model.advance(child, 0)
        runner_output = ModelRunnerOutput(req_ids=[r.request_id for r in sampled],
                                          sampled_token_ids=[token] * len(sampled), logprobs=[None] * len(sampled))
        self.scheduler.update_from_output(out, runner_output)
        for r in sampled:
            if r.finished:
                self.model.remove(r)
                if r.group.finished:
                    self.groups.pop(r.group.request_id, None)

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
        assert waiting == want_waiting, (
            f"waiting queue {_short(waiting)}, the policy has {_short(want_waiting)} (preempted requests "
            f"re-enter at the head, the last chosen first)")
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
        bound = liveness_bound(self.model.policy, samples)
        builtin = type(self.model.policy) in (SpecFCFS, SpecPriority)
        steps = 0
        while self.scheduler.has_work():
            assert self._step(1) > 0, "scheduler stalled: work queued but nothing scheduled"
            self.queues_match_model()
            steps += 1
            assert steps <= bound, (
                f"{self.model.policy.name}: unfinished after {bound} steps with no new work (starvation or "
                f"livelock): running {_short(_ids(self.scheduler.running))}, "
                f"waiting {_short(_ids(self.scheduler.waiting))}" + ("" if builtin else (
                    f"; the scheduler followed the policy {self.model.policy!r} at every step, so the policy "
                    f"itself never lets these finish (e.g. its victims keep losing their progress; "
                    f"preempting the latest admitted, running[-1], is always live)")))
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


def make_scheduler_machine(factory, name: str = "SchedulerMachine", setup: dict | None = None,
                           policies: list[str | SchedulingPolicy] | None = None) -> type[SchedulerMachine]:
    """A `SchedulerMachine` for another scheduler implementation; use its `.TestCase`.
    `setup` replaces some of the configuration strategies (see `GENERAL_SETUP`); by default a run
    draws from the general space or the memory-pressure one. `policies` (built-in names or
    `SchedulingPolicy` objects) replaces the drawn policy, in every space."""
    attrs = {"factory": staticmethod(factory)}
    setups = SchedulerMachine.SETUPS if setup is None else ({**GENERAL_SETUP, **setup},)
    if policies:
        setups = tuple({**space, "policy": st.sampled_from(list(policies))} for space in setups)
    if setup is not None or policies:
        attrs["SETUPS"] = setups
    return type(name, (SchedulerMachine,), attrs)


# ----------------------------------------------------------------------------- scripted scenarios
# Situations that random programs reach rarely (each about 1 in 300 in the pressure space), run
# through the same machine and model every time the tier runs. Each is (configuration, program):
# ("add", prompt length, max_tokens, priority) queues an all-ones prompt; ("step", k) steps k times.

SCENARIOS: dict[str, tuple[dict, list[tuple]]] = {
    # Under priority, a victim already granted a decode this step gives its token back, and the
    # refund lets a later running request's prefill chunk grow by one (step 9: ('3', 6), not 5).
    "victim granted tokens this step gives them back": (
        dict(block_size=2, extra_blocks=1, max_num_seqs=4, budget_extra=4, chunked=True, threshold=0,
             policy="priority", caching=False),
        [("add", 20, 16, 0), ("step", 2), ("add", 5, 15, 2), ("step", 1), ("add", 26, 8, 1),
         ("add", 28, 19, 1), ("step", 4), ("step", 4)],
    ),
    # Under fcfs, one step preempts two requests: each is prepended as it is chosen, so they go
    # back in admission order ('1' before '2') ahead of the never-admitted.
    "two victims of one step re-enter in admission order": (
        dict(block_size=2, extra_blocks=0, max_num_seqs=4, budget_extra=0, chunked=True, threshold=0,
             policy="fcfs", caching=False),
        [("add", 36, 13, 0), ("add", 16, 16, 0), ("step", 2), ("add", 23, 11, 1), ("step", 2), ("step", 4)],
    ),
}


class _Fixed:
    """Stands in for Hypothesis' `data` in a scripted program: every draw returns one value."""

    def __init__(self, value):
        self.value = value

    def draw(self, strategy, label=None):
        return self.value


def run_scenarios(factory=Scheduler) -> list[str]:
    """Run every scripted scenario against the scheduler `factory` makes; raises AssertionError
    naming the scenario at the first disagreement with the policy; returns the names run."""
    for name, (config, program) in SCENARIOS.items():
        try:
            run_program(config, program, factory)
        except AssertionError as err:
            raise AssertionError(f"scripted scenario {name!r}: {err}") from err
    return list(SCENARIOS)


def run_program(config: dict, program: list[tuple], factory=Scheduler) -> None:
    """One scripted program in the format of `SCENARIOS` (its `policy` may be a SchedulingPolicy
    object) on a fresh machine, checked at every step, then the teardown's liveness check."""
    machine = make_scheduler_machine(factory, "ScriptedSchedulerMachine")()
    machine._setup(**config)
    for op in program:
        if op[0] == "add":
            _, length, max_tokens, priority = op
            machine.add(length=length, data=_Fixed([1] * length), max_tokens=max_tokens,
                        priority=priority, n=1, prompt_logprobs=None)
        else:
            machine.step(token=0, steps=op[1])
    machine.teardown()


@dataclass
class ScenariosThenMachines:
    """The scheduler tier's run, as the machine classes a runner iterates over: iterating first
    runs the scripted scenarios on the scheduler under test, then yields the random machine."""

    factory: object
    machines: list

    @property
    def targeted(self) -> int:
        return len(SCENARIOS)

    def __iter__(self):
        run_scenarios(self.factory)
        yield from self.machines

