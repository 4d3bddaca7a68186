"""A Hypothesis state machine for a continuous-batching scheduler, with a fake model.

Shipped in the package so any scheduler with the same small surface (`add`, `schedule`,
`remove`, `running`, `waiting`, `check_invariants`) can be checked. Tokens are "generated"
by the machine itself (no model), so thousands of steps run in seconds.

Checked after every step, against the machine's own model of the queues:
- scheduled tokens <= max_num_batched_tokens; running <= max_num_seqs; nothing both waiting and
  running; every scheduled chunk lies within the request's uncomputed tokens;
- waiting requests are admitted in policy order (FCFS: arrival, preempted ones first;
  priority: (priority, arrival)) and never overtake each other;
- a step that preempted admits nothing; a step that admitted scheduled every request that
  was running and not preempted (running first);
- when no new work arrives, every request finishes within a bounded number of steps.
"""

from __future__ import annotations

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fast.kv_cache_manager import KVCacheConfig, KVCacheManager
from fast.request import Request, RequestGroup, Status
from fast.scheduler import Scheduler, SchedulerConfig
from ref.sampling_params import SamplingParams
from ref.sequence import Sequence, StopContext
from ref.tokenizer import TextCodec

MAX_MODEL_LEN = 64
STOP_CTX = StopContext(eos_token_ids=(), max_model_len=MAX_MODEL_LEN, codec=TextCodec(None))


def make_request(rid: str, prompt: list[int], max_tokens: int, arrival: int, priority: int) -> Request:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    group = RequestGroup(rid, None, prompt, params, STOP_CTX)
    req = Request(rid, group, Sequence(0, params, None), list(prompt), arrival=arrival, priority=priority)
    group.samples.append(req)
    return req


class SchedulerMachine(RuleBasedStateMachine):
    """Random adds, steps and aborts; invariants after each; a final drain proves liveness."""

    factory = Scheduler  # (SchedulerConfig, KVCacheManager) -> scheduler under test

    @initialize(
        block_size=st.sampled_from([2, 4, 8]),
        extra_blocks=st.integers(0, 24),
        max_num_seqs=st.integers(1, 6),
        budget_extra=st.integers(0, 40),
        chunked=st.booleans(),
        threshold=st.sampled_from([0, 0, 3, 16]),
        policy=st.sampled_from(["fcfs", "priority"]),
        caching=st.booleans(),
    )
    def setup(self, block_size, extra_blocks, max_num_seqs, budget_extra, chunked, threshold, policy, caching):
        num_blocks = -(-MAX_MODEL_LEN // block_size) + extra_blocks
        budget = max_num_seqs + budget_extra
        if not chunked:
            budget = max(budget, MAX_MODEL_LEN)
        self.config = SchedulerConfig(max_num_seqs, budget, MAX_MODEL_LEN, chunked, threshold, policy)
        self.kv = KVCacheManager(KVCacheConfig(num_blocks, block_size, caching))
        self.scheduler = type(self).factory(self.config, self.kv)
        self.model_waiting: list[Request] = []  # the machine's own queue model
        self.live: dict[str, Request] = {}
        self.next_id = 0
        note(f"config={self.config} num_blocks={num_blocks}")

    @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=40), max_tokens=st.integers(1, 20),
          priority=st.integers(0, 2))
    def add(self, prompt, max_tokens, priority):
        """Queue a request (small alphabet: prefixes collide)."""
        rid = str(self.next_id)
        req = make_request(rid, prompt, min(max_tokens, MAX_MODEL_LEN - len(prompt) + 1) or 1, self.next_id, priority)
        self.next_id += 1
        self.scheduler.add(req)
        self.model_waiting.append(req)
        self.live[rid] = req
        note(f"add {rid} len={len(prompt)} max_tokens={req.params.max_tokens} prio={priority}")

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data):
        """Abort a live request: it leaves every queue and frees its blocks."""
        rid = data.draw(st.sampled_from(sorted(self.live)))
        req = self.live.pop(rid)
        req.seq.finish("abort")
        if req in self.model_waiting:
            self.model_waiting.remove(req)
        self.scheduler.remove(req)
        note(f"abort {rid}")

    @rule(token=st.integers(0, 2))
    def step(self, token):
        """One schedule + the engine's bookkeeping, with `token` as every sampled token."""
        self._step(token)

    def _step(self, token: int) -> int:
        running_before = [r for r in self.scheduler.running]
        order = self._policy_order()
        out = self.scheduler.schedule()
        self.scheduler.check_invariants(out)
        scheduled = {id(s.request): s for s in out.scheduled}
        admitted = [s.request for s in out.scheduled if s.request in self.model_waiting]
        for s in out.scheduled:
            r = s.request
            assert 1 <= s.num_new_tokens <= r.num_tokens - r.num_computed_tokens, (s.num_new_tokens, r.num_tokens)
        # Admission follows the policy order and never skips a request.
        assert admitted == order[: len(admitted)], (
            f"admitted {[r.request_id for r in admitted]} but policy order is {[r.request_id for r in order]}")
        if out.preempted:
            assert not admitted, "a step that preempted admitted new requests"
        if admitted:
            missing = [r.request_id for r in running_before if id(r) not in scheduled and r not in out.preempted]
            assert not missing, f"waiting requests admitted before running {missing} were scheduled"
        for r in admitted:
            self.model_waiting.remove(r)
        for r in reversed(out.preempted):
            if r in self.model_waiting:
                self.model_waiting.remove(r)
            self.model_waiting.insert(0, r)
        self._advance(out, token)
        note(f"step: scheduled={[(s.request.request_id, s.num_new_tokens) for s in out.scheduled]} "
             f"preempted={[r.request_id for r in out.preempted]}")
        return len(out.scheduled)

    def _advance(self, out, token: int) -> None:
        for s in out.scheduled:
            r = s.request
            r.num_computed_tokens += s.num_new_tokens
            self.kv.cache_full_blocks(r.request_id, r.token_ids, r.num_computed_tokens)
            if r.num_computed_tokens == r.num_tokens:
                r.append_token(token)
                if r.finished:
                    self.scheduler.remove(r)
                    del self.live[r.request_id]

    def _policy_order(self) -> list[Request]:
        if self.config.policy == "priority":
            return sorted(self.model_waiting, key=lambda r: (r.priority, r.arrival))
        return list(self.model_waiting)

    @invariant()
    def queues_match_model(self):
        if not hasattr(self, "scheduler"):
            return
        assert {id(r) for r in self.scheduler.waiting} == {id(r) for r in self.model_waiting}
        for r in self.scheduler.running:
            assert r.status is Status.RUNNING and r.request_id in self.live
        self.kv.check_invariants()

    def teardown(self):
        """Liveness: with no new work, everything finishes and every block comes back."""
        if not hasattr(self, "scheduler"):
            return
        bound = 10 + sum(r.num_tokens + r.params.max_tokens for r in self.live.values()) * (len(self.live) + 1)
        steps = 0
        while self.scheduler.has_work():
            assert self._step(1) > 0, "scheduler stalled: work queued but nothing scheduled"
            steps += 1
            assert steps <= bound, f"no progress within {bound} steps (livelock?)"
        assert not self.live
        assert self.kv.num_free_blocks == self.kv.config.num_blocks
        self.kv.check_invariants()


def make_scheduler_machine(factory, name: str = "SchedulerMachine") -> type[SchedulerMachine]:
    """A `SchedulerMachine` for another scheduler implementation; use its `.TestCase`."""
    return type(name, (SchedulerMachine,), {"factory": staticmethod(factory)})
