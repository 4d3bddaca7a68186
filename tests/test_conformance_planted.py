"""Each tier catches a planted bug: a defect injected into fast makes the suite fail, usefully.

The defects are monkeypatched into this process's fast engine (a copy of it, in effect), and the
suite's own checks (conformance/tiers.py) run against it with shrinking off.
"""

from __future__ import annotations

import torch

from conformance.adapters import FastAdapter
from conformance.runner import run_check
from conformance.tiers import CHECKS, MAX_MODEL_LEN, Context, Profile

PROFILE = Profile("planted", examples=12, max_requests=10, stateful_steps=40, families=False, kernel_max_seq_len=64)


def run(tier: str, name: str, model_dir: str, seed: int | None = 1234, profile: Profile = PROFILE):
    check = next(c for c in CHECKS if c.tier == tier and c.name == name)
    make = lambda d, **o: FastAdapter(d, **o)  # noqa: E731
    ctx = Context(adapter=make(model_dir, max_model_len=MAX_MODEL_LEN), model_dir=model_dir, profile=profile,
                  make_adapter=make)
    return run_check(check, ctx, seed=seed, shrink=False, replay="")


def test_clean_engine_passes_the_checks_used_below(tiny_model_dir):
    for tier, name in [("e2e", "workloads_vs_oracle"), ("allocator", "state_machine"),
                       ("determinism", "batch_invariance"), ("e2e", "stops_at_the_limit"),
                       ("determinism", "same_seed_same_output"), ("determinism", "unseeded_requests_differ")]:
        result = run(tier, name, tiny_model_dir)
        assert result.status == "passed", result.message


def test_off_by_one_slot_is_caught(tiny_model_dir, monkeypatch):
    from fast.worker.model_runner import ModelRunner

    original = ModelRunner.prepare

    def shifted(self, scheduler_output):
        inputs = original(self, scheduler_output)
        total = self.kv_caches[0][0].shape[0] * self.block_size
        inputs.slot_mapping = (inputs.slot_mapping + 1) % total
        return inputs

    monkeypatch.setattr(ModelRunner, "prepare", shifted)
    result = run("e2e", "workloads_vs_oracle", tiny_model_dir)
    assert result.status == "failed"
    assert "differs" in result.message and "oracle" in result.message  # names the token and both values


def test_missing_causal_mask_is_caught(tiny_model_dir, monkeypatch):
    import fast.attention.torch_backend as tb

    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    class NoCausal:
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        @staticmethod
        def scaled_dot_product_attention(q, k, v, attn_mask=None, scale=None, is_causal=False, **kwargs):
            # the prefill-chunk path's causal mask: an explicit 2-D one, or is_causal
            if attn_mask is not None and attn_mask.dim() == 2:
                attn_mask = None
            return real_sdpa(q, k, v, attn_mask=attn_mask, scale=scale, **kwargs)

    monkeypatch.setattr(tb, "F", NoCausal())
    result = run("kernel", "paged_vs_dense", tiny_model_dir)
    assert result.status == "failed"
    assert "elements differ" in result.message and "worst at" in result.message


def test_refcount_not_decremented_is_caught(tiny_model_dir, monkeypatch):
    from fast.core.block_pool import BlockPool

    def leaky_free(self, blocks):
        for block in blocks:
            if block.ref_cnt == 1:  # shared blocks never lose their reference
                block.ref_cnt = 0
                self._free.append(block)

    monkeypatch.setattr(BlockPool, "free_blocks", leaky_free)
    result = run("allocator", "state_machine", tiny_model_dir)
    assert result.status == "failed"
    assert "ref_cnt" in result.message


def test_wrong_rope_position_after_preemption_is_caught(tiny_model_dir, monkeypatch):
    from fast.worker.model_runner import ModelRunner

    original_prepare, original_update = ModelRunner.prepare, ModelRunner._update_state
    resumed: set = set()

    def update_state(self, cached):
        if cached.resumed:
            resumed.add(cached.req_id)
        original_update(self, cached)

    def prepare(self, scheduler_output):
        inputs = original_prepare(self, scheduler_output)
        for st, row, _, length in inputs.chunks:
            # The recompute after a preemption places the recomputed tokens one position late;
            # later decodes are placed right, so relative distances are wrong.
            if st.req_id in resumed and length > 1:
                inputs.positions[row: row + length] += 1
        return inputs

    monkeypatch.setattr(ModelRunner, "_update_state", update_state)
    monkeypatch.setattr(ModelRunner, "prepare", prepare)
    result = run("e2e", "workloads_vs_oracle", tiny_model_dir)
    assert result.status == "failed"
    assert "differs" in result.message or "vs oracle" in result.message  # a token, or a logprob value


def test_seed_ignored_in_batch_is_caught(tiny_model_dir, monkeypatch):
    import fast.worker.model_runner
    from fast.worker.sampler import SamplingRow

    def unseeded_row(params, prompt_ids, output_ids, generator, *rest):
        return SamplingRow(params, prompt_ids, output_ids, None if generator is None else torch.default_generator,
                           *rest)

    monkeypatch.setattr(fast.worker.model_runner, "SamplingRow", unseeded_row)
    result = run("determinism", "batch_invariance", tiny_model_dir)
    assert result.status == "failed"
    assert "differs" in result.message


# ----------------------------------------------------------------------------- scheduler policy
# Each plants one realistic policy bug in fast's Scheduler; the scheduler tier's state machine
# (conformance/scheduler_machine.py) must fail naming the step, the requests and the rule.

def _scheduler_fails(tiny_model_dir):
    # seed None: derandomized (a state machine run ignores a Hypothesis seed). Which check fires
    # first depends on the draws; every one of them names the step or request and "the policy".
    result = run("scheduler", "state_machine", tiny_model_dir, seed=None)
    assert result.status == "failed", "the planted scheduler bug went unnoticed"
    first_line = result.message.splitlines()[0]
    assert "the policy" in first_line, first_line
    return result


def test_scheduler_clean_passes(tiny_model_dir):
    result = run("scheduler", "state_machine", tiny_model_dir, seed=None)
    assert result.status == "passed", result.message


def test_wrong_victim_fcfs_earliest_is_caught(tiny_model_dir, monkeypatch):
    from fast.core.scheduler import Scheduler

    original = Scheduler._pick_victim

    def earliest(self):  # preempts the oldest running request instead of the latest admitted
        return self.running[0] if self.config.policy == "fcfs" else original(self)

    monkeypatch.setattr(Scheduler, "_pick_victim", earliest)
    _scheduler_fails(tiny_model_dir)


def test_victim_by_arrival_not_admission_is_caught(tiny_model_dir, monkeypatch):
    """The bug this machine found in fast: the largest arrival is not the latest admitted once
    forked samples (n > 1) join the running set after later requests."""
    from fast.core.scheduler import Scheduler

    original = Scheduler._pick_victim

    def by_arrival(self):
        return max(self.running, key=lambda r: r.arrival) if self.config.policy == "fcfs" else original(self)

    monkeypatch.setattr(Scheduler, "_pick_victim", by_arrival)
    _scheduler_fails(tiny_model_dir)


def test_wrong_victim_priority_is_caught(tiny_model_dir, monkeypatch):
    from fast.core.scheduler import Scheduler

    original = Scheduler._pick_victim

    def highest_first(self):  # preempts the most urgent request (priority inverted)
        if self.config.policy == "priority":
            return max(self.running, key=lambda r: (-r.priority, r.arrival))
        return original(self)

    monkeypatch.setattr(Scheduler, "_pick_victim", highest_first)
    _scheduler_fails(tiny_model_dir)


def test_preempted_requeued_at_tail_is_caught(tiny_model_dir, monkeypatch):
    from fast.core.scheduler import Scheduler

    original = Scheduler._preempt

    def to_tail(self, request, out, **kw):
        original(self, request, out, **kw)
        self.waiting.remove(request)
        self.waiting.append(request)

    monkeypatch.setattr(Scheduler, "_preempt", to_tail)
    _scheduler_fails(tiny_model_dir)


def test_two_victims_requeued_in_choice_order_is_caught(tiny_model_dir, monkeypatch):
    """Two victims of one step re-queued first-chosen first: under fcfs that puts a later
    admitted request ahead of an earlier one (SPEC §10: each victim is prepended)."""
    from fast.core.scheduler import Scheduler

    original = Scheduler._preempt

    def in_choice_order(self, request, out, **kw):
        earlier = len(out.preempted)  # victims already chosen this step stay ahead
        original(self, request, out, **kw)
        self.waiting.remove(request)
        self.waiting.insert(earlier, request)

    monkeypatch.setattr(Scheduler, "_preempt", in_choice_order)
    _scheduler_fails(tiny_model_dir)


def test_victim_keeping_its_granted_tokens_is_caught(tiny_model_dir, monkeypatch):
    """A victim already granted tokens this step is unscheduled but its tokens are not given back
    to the budget: a later running request's chunk is one token short. Random programs reach
    this about 1 time in 300; the tier's scripted scenario reaches it every run."""
    from fast.core.scheduler import Scheduler

    original = Scheduler._unschedule

    def no_refund(self, plan, victim):
        original(self, plan, victim)
        return 0

    monkeypatch.setattr(Scheduler, "_unschedule", no_refund)
    result = _scheduler_fails(tiny_model_dir)
    assert "scripted scenario 'victim granted tokens this step gives them back'" in result.message


def test_priority_ties_by_queue_position_is_caught(tiny_model_dir, monkeypatch):
    from fast.core.scheduler import Scheduler

    original = Scheduler._next_waiting

    def ties_by_position(self):  # equal priorities: whoever is nearer the head, not the earlier arrival
        if self.config.policy == "priority":
            return min(self.waiting, key=lambda r: r.priority)
        return original(self)

    monkeypatch.setattr(Scheduler, "_next_waiting", ties_by_position)
    _scheduler_fails(tiny_model_dir)


def test_admission_after_preemption_is_caught(tiny_model_dir, monkeypatch):
    from fast.core.scheduler import Scheduler, _Plan

    def schedule(self):
        plan = _Plan()
        budget = self._schedule_running(plan, self.config.max_num_batched_tokens)
        self._schedule_waiting(plan, budget)  # admits even in a step that preempted
        self._fork(plan)
        return self._to_output(plan)

    monkeypatch.setattr(Scheduler, "schedule", schedule)
    _scheduler_fails(tiny_model_dir)


def test_overtaking_is_caught(tiny_model_dir, monkeypatch):
    from fast.core.scheduler import Scheduler

    original = Scheduler._next_waiting

    def skip_big(self):  # lets a small request jump a head that does not fit the budget
        head = original(self)
        short = [r for r in self.waiting if r.num_tokens < head.num_tokens]
        return short[0] if short and head.num_tokens > 8 else head

    monkeypatch.setattr(Scheduler, "_next_waiting", skip_big)
    _scheduler_fails(tiny_model_dir)


def test_forks_ignore_max_num_seqs_is_caught(tiny_model_dir, monkeypatch):
    from fast.core.request import Status
    from fast.core.scheduler import Scheduler

    def add_running(self, request):  # n > 1 samples not counted against max_num_seqs
        request.status = Status.RUNNING
        self.running.append(request)
        return True

    monkeypatch.setattr(Scheduler, "add_running", add_running)
    # Forks join inside schedule(), so the scheduler's own invariant check (run by the machine
    # right after it) is the first to see the overfull running set.
    result = run("scheduler", "state_machine", tiny_model_dir, seed=None)
    assert result.status == "failed", "the planted scheduler bug went unnoticed"
    first_line = result.message.splitlines()[0]
    assert any(k in first_line for k in ("running > max_num_seqs", "the policy", "scheduled with 0 tokens")), first_line


def test_prefix_hit_for_prompt_logprobs_is_caught(tiny_model_dir, monkeypatch):
    from fast.core.scheduler import Scheduler

    monkeypatch.setattr(Scheduler, "_lookup", lambda self, r: self.kv.get_computed_blocks(r.token_ids))
    _scheduler_fails(tiny_model_dir)


# ----------------------------------------------------------------------------- outputs and logprobs

def test_topk_values_on_wrong_tokens_is_caught(tiny_model_dir, monkeypatch):
    """The right top-k values, but attached to the top-k tokens in reverse order: the sampled
    token's logprob and the sorted values are all correct, only the token ids are not."""
    import fast.worker.model_runner
    import fast.worker.sampler
    from ref.outputs import Logprob

    original = fast.worker.sampler.logprob_entry

    def misattributed(row, token_id, top_ids):
        entry = original(row, token_id, top_ids)
        top = [t for t in top_ids if t != token_id]
        good = [entry[t] for t in top]
        out = {token_id: entry[token_id]}
        for t, lp in zip(reversed(top), good):
            out[t] = Logprob(lp.logprob, lp.rank)
        return out

    monkeypatch.setattr(fast.worker.sampler, "logprob_entry", misattributed)
    monkeypatch.setattr(fast.worker.model_runner, "logprob_entry", misattributed)
    result = run("e2e", "workloads_vs_oracle", tiny_model_dir)
    assert result.status == "failed"
    assert "logprobs[" in result.message and "oracle" in result.message


def test_logprob_rank_off_by_one_is_caught(tiny_model_dir, monkeypatch):
    import fast.worker.model_runner
    import fast.worker.sampler
    from ref.outputs import Logprob

    original = fast.worker.sampler.logprob_entry

    def counts_itself(row, token_id, top_ids):  # rank = 1 + #(>=), not 1 + #(>)
        return {t: Logprob(lp.logprob, lp.rank + 1, lp.decoded_token)
                for t, lp in original(row, token_id, top_ids).items()}

    monkeypatch.setattr(fast.worker.sampler, "logprob_entry", counts_itself)
    monkeypatch.setattr(fast.worker.model_runner, "logprob_entry", counts_itself)
    result = run("e2e", "workloads_vs_oracle", tiny_model_dir)
    assert result.status == "failed"
    assert "rank" in result.message


def test_decoded_token_of_the_wrong_token_is_caught(tiny_model_dir, monkeypatch):
    import fast.core.scheduler
    from ref.outputs import Logprob

    def shifted_text(entry, group):  # each token gets the text of the next token id
        token_text = group.stop_ctx.codec.token_text
        return {t: Logprob(lp.logprob, lp.rank, token_text(t + 1)) for t, lp in entry.items()}

    monkeypatch.setattr(fast.core.scheduler, "_with_text", shifted_text)
    result = run("e2e", "workloads_vs_oracle", tiny_model_dir)
    assert result.status == "failed"
    assert "decoded_token" in result.message


def test_generate_dropping_an_output_is_caught(tiny_model_dir, monkeypatch):
    from fast.engine.llm import LLM

    original = LLM.generate

    def drops_last(self, prompts, sampling_params=None, use_tqdm=True, priority=None):
        outs = original(self, prompts, sampling_params, use_tqdm, priority)
        return outs[:-1] if len(outs) > 1 else outs

    monkeypatch.setattr(LLM, "generate", drops_last)
    result = run("determinism", "same_seed_same_output", tiny_model_dir)
    assert result.status == "failed"
    assert "outputs for" in result.message and "requests" in result.message


def test_engine_never_reporting_a_finished_request_is_caught(tiny_model_dir, monkeypatch):
    from fast.engine.llm_engine import LLMEngine

    def collect(self, touched):  # forgets the final output: the request vanishes unreported
        outputs = []
        for group in touched:
            rid = group.request_id
            if self.groups.get(rid) is not group:
                continue
            if group.finished:
                del self.groups[rid]
                continue
            outputs.append(group.to_output())
        return outputs

    monkeypatch.setattr(LLMEngine, "_collect", collect)
    result = run("e2e", "workloads_vs_oracle", tiny_model_dir)
    assert result.status == "failed"
    assert "never finished" in result.message


# ----------------------------------------------------------------------------- seeds and limits

def test_unseeded_requests_sharing_one_base_seed_is_caught(tiny_model_dir, monkeypatch):
    import fast.engine.llm_engine

    monkeypatch.setattr(fast.engine.llm_engine, "draw_base_seed", lambda generator: 12345)  # never advances
    result = run("determinism", "unseeded_requests_differ", tiny_model_dir)
    assert result.status == "failed"
    assert "share one random stream" in result.message or "generator restarted" in result.message


def test_seeded_request_depending_on_other_seeds_is_caught(tiny_model_dir, monkeypatch):
    """Seeded samples draw from a generator seeded from all the seeds of their generate call
    (one generator per batch, keyed by the batch's seeds), not from their own seed alone."""
    import fast.engine.llm_engine
    from fast.engine.llm import LLM
    from ref.sampling_params import SamplingParams
    from ref.sequence import sample_seed

    batch_seeds: list[int] = []
    original_generate = LLM.generate

    def generate(self, prompts, sampling_params=None, *args, **kwargs):
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params]
        batch_seeds[:] = [p.seed for p in params if p is not None and p.seed is not None]
        return original_generate(self, prompts, sampling_params, *args, **kwargs)

    def batch_keyed(params, base_seed, index):
        if params.seed is not None and batch_seeds:
            params = SamplingParams(**{**params.__dict__, "seed": hash(tuple(batch_seeds)) % 2**32})
        return sample_seed(params, base_seed, index)

    monkeypatch.setattr(fast.engine.llm_engine, "sample_seed", batch_keyed)
    monkeypatch.setattr(LLM, "generate", generate)
    # It shows only for a seeded target that truly samples (not top_k=1) beside seeded requests:
    # more examples than the other plants (Hypothesis' draws also differ with the tests run before).
    result = run("determinism", "batch_invariance", tiny_model_dir, profile=Profile(
        "planted-30", examples=30, max_requests=10, stateful_steps=40, families=False, kernel_max_seq_len=64))
    assert result.status == "failed"
    assert "differs" in result.message


def test_prompt_of_exactly_max_model_len_rejected_is_caught(tiny_model_dir, monkeypatch):
    """An off-by-one in the engine's own length check: a prompt of max_model_len tokens (which
    SPEC §5 says yields one token) is refused."""
    import fast.engine.llm_engine

    original = fast.engine.llm_engine.validate_request

    def off_by_one(processed, params, limits, has_tokenizer):
        if len(processed.prompt_token_ids) >= limits.max_model_len:
            raise ValueError(f"prompt must be shorter than max_model_len ({limits.max_model_len})")
        return original(processed, params, limits, has_tokenizer)

    monkeypatch.setattr(fast.engine.llm_engine, "validate_request", off_by_one)
    result = run("e2e", "workloads_vs_oracle", tiny_model_dir)
    assert result.status == "failed"
    assert "max_model_len" in result.message


def test_min_tokens_mask_lifted_one_token_early_is_caught(tiny_model_dir, monkeypatch):
    """min_tokens off by one in the engine's own sampler: stop tokens are allowed at the last
    masked position. Only a stop token that is the argmax exactly there shows it."""
    from fast.worker.sampler import NEG_INF, Sampler

    def early(self, logits, rows):
        for i, r in enumerate(rows):
            p = r.params
            if len(r.output_ids) < p.min_tokens - 1:
                stop = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
                logits[i, stop] = NEG_INF
        return logits

    monkeypatch.setattr(Sampler, "_apply_min_tokens", early)
    result = run("e2e", "stops_at_the_limit", tiny_model_dir)
    assert result.status == "failed"
    assert "differs" in result.message or "min_tokens" in result.message
