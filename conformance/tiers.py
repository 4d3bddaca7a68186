"""The nine tiers of checks. Each check is a Hypothesis property run against an adapter.

A check returns normally (passed), raises (failed: the minimal example is in the message), or
raises `NotApplicable` when the adapter lacks the hook the check needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from hypothesis import strategies as st

from conformance.compare import LOGIT_ATOL, assert_close, check_outputs_complete, check_request_outputs
from conformance.coverage import (PROFILE_SCALE, Coverage, e2e_minimums, metric_features, option_features,
                                 output_features)
from conformance.driver import run_targeted, run_workload
from conformance.structured import build_structured
from conformance.workloads import Workload, fast_engine_options, workloads
from ref.inputs import (
    DEFAULT_MAX_N, MAX_BAD_WORD_CHARS, MAX_BAD_WORDS, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS,
    MAX_STRUCTURED_CHARS,
)
from ref.sampling_params import SamplingParams, StructuredOutputsParams

TIERS = ("model", "kernel", "allocator", "scheduler", "sampler", "e2e", "determinism", "robustness", "structured")
MAX_MODEL_LEN = 128


class NotApplicable(Exception):
    """The engine does not expose what this check needs."""


@dataclass
class Profile:
    name: str
    examples: int  # Hypothesis examples per property check
    max_requests: int  # per e2e workload
    stateful_steps: int
    families: bool  # also check the other families' tiny checkpoints in tier 1
    kernel_max_seq_len: int


PROFILES = {
    "quick": Profile("quick", examples=12, max_requests=12, stateful_steps=25, families=True, kernel_max_seq_len=96),
    "full": Profile("full", examples=25, max_requests=24, stateful_steps=50, families=True, kernel_max_seq_len=300),
    "deep": Profile("deep", examples=200, max_requests=40, stateful_steps=100, families=True, kernel_max_seq_len=600),
}


@dataclass
class Context:
    """What every check gets: the engine under test, the oracle, the model, the profile."""

    adapter: Any
    model_dir: str
    profile: Profile
    make_adapter: Callable[..., Any]  # (model_dir, **options) -> adapter of the same engine
    options: dict = field(default_factory=dict)
    # `--policy`: scheduling policies (built-in names or `module:attr`) the scheduler and e2e tiers
    # use instead of drawing "fcfs" or "priority".
    policies: tuple[str, ...] = ()
    _oracles: dict = field(default_factory=dict)  # dtype -> RefAdapter
    _rules: Any = None

    @property
    def rules(self):
        """SPEC's output rules for this model, read from the checkpoint without ref/ code."""
        if self._rules is None:
            from conformance.contract import ModelRules

            self._rules = ModelRules.from_checkpoint(self.model_dir, MAX_MODEL_LEN)
        return self._rules

    @property
    def oracle(self):
        """The oracle in the checkpoint's own dtype."""
        return self.oracle_for("auto")

    def oracle_for(self, dtype: str):
        """The oracle with its weights and activations in `dtype` ("auto": the checkpoint's)."""
        if dtype not in self._oracles:
            from conformance.adapters import RefAdapter

            self._oracles[dtype] = RefAdapter(self.model_dir, max_model_len=MAX_MODEL_LEN, max_batch=64,
                                              **({} if dtype == "auto" else {"dtype": dtype}))
        return self._oracles[dtype]

    def supported(self, workload: Workload, vs_oracle: bool = False) -> Workload:
        """The workload without the requests the engine declares it cannot run, or (vs_oracle)
        whose outputs it does not promise to equal the oracle's; at least one request kept."""
        from hypothesis import assume

        unsupported = getattr(self.adapter, "unsupported", lambda p: None)
        comparable = getattr(self.adapter, "comparable", lambda p: True) if vs_oracle else (lambda p: True)
        keep = [i for i, p in enumerate(workload.params) if unsupported(p) is None and comparable(p)]
        if len(keep) == len(workload.params):
            return workload
        assume(keep)
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        return Workload(pick(workload.prompts), pick(workload.params), pick(workload.priorities), {})

    def hook(self, name: str):
        value = getattr(self.adapter, name, None)
        if value is None:
            raise NotApplicable(f"the engine exposes no `{name}` hook")
        return value


@dataclass
class Check:
    tier: str
    name: str
    # Returns (strategy, body): the runner draws from `strategy` and calls body(ctx, value).
    build: Callable[[Context], tuple[st.SearchStrategy, Callable[[Context, Any], None]]]
    stateful: bool = False  # build returns a RuleBasedStateMachine class instead
    example_scale: int = 1  # examples = profile.examples x this (cheap checks draw more)


# ----------------------------------------------------------------------------- 1. model

def _hf_logits(model_dir: str, token_ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([token_ids])).logits[0].float()


def _vocab(model_dir: str) -> int:
    from ref.config import ModelConfig

    return ModelConfig.from_pretrained(model_dir).vocab_size


def build_logits_vs_hf(ctx: Context):
    model_logits = ctx.hook("model_logits")
    vocab = _vocab(ctx.model_dir)

    def body(ctx, prompt):
        assert_close("teacher-forced logits vs transformers", model_logits(prompt), _hf_logits(ctx.model_dir, prompt),
                     atol=LOGIT_ATOL[torch.float32])

    return st.lists(st.integers(0, vocab - 1), min_size=1, max_size=64), body


def build_families_vs_hf(ctx: Context):
    ctx.hook("model_logits")
    from ref.models import tiny_checkpoint

    families = ("llama", "mistral", "qwen2", "qwen3")

    def body(ctx, case):
        family, prompt = case
        path = str(tiny_checkpoint(family, seed=1, tokenizer=False))
        adapter = ctx.make_adapter(path, max_model_len=MAX_MODEL_LEN)
        assert_close(f"{family} teacher-forced logits vs transformers", adapter.model_logits(prompt),
                     _hf_logits(path, prompt), atol=LOGIT_ATOL[torch.float32])

    return st.tuples(st.sampled_from(families), st.lists(st.integers(0, 511), min_size=1, max_size=48)), body


# ----------------------------------------------------------------------------- 2. kernel

def build_kernels(ctx: Context):
    """Targeted cases reaching every required kernel path first (a failure, or a path no case
    reaches, fails the check naming it), then random batches; see conformance/kernels.py."""
    backends = ctx.hook("attention_backends")()
    from conformance.kernels import CaseLimits, KernelTier

    limits = CaseLimits(max_seq_len=ctx.profile.kernel_max_seq_len, max_seqs=4)
    slow = CaseLimits(max_seq_len=48, max_seqs=3, max_kv_heads=1, head_dims=(32,))
    interpreted = not torch.cuda.is_available()
    tier = KernelTier(backends, {n: slow if n == "triton" and interpreted else limits for n in backends})
    run, ran = tier.run, [0]  # count the targeted batches (one per case and backend it applies to)
    tier.run = lambda *args: (ran.__setitem__(0, ran[0] + 1), run(*args))[1]
    try:
        tier.run_targeted()
    finally:
        del tier.run
    tier.targeted = ran[0]
    return tier.random_cases(), tier.check_random


# ----------------------------------------------------------------------------- 3. allocator

def build_allocator(ctx: Context):
    """Small pools, prefix caching on and off, and a weak hash (3 buckets, salt-blind) under which
    most blocks collide; fails too if no run produced hits, rejected collisions or evictions."""
    factory = ctx.hook("allocator_factory")
    from conformance.allocator import AllocatorCoverage, machines_then_coverage, make_allocator_machine, weak_block_hash
    from fast.core.kv_cache_manager import KVCacheConfig

    configs = {f"Allocator_{i}": KVCacheConfig(num_blocks=n, block_size=b, enable_prefix_caching=c)
               for i, (n, b, c) in enumerate(((6, 2, True), (10, 4, True), (5, 1, False)))}
    configs["Allocator_weak_hash"] = KVCacheConfig(num_blocks=6, block_size=2, hash_fn=weak_block_hash)
    coverage = AllocatorCoverage()
    machines = [make_allocator_machine(c, factory, name, coverage) for name, c in configs.items()]
    run = machines_then_coverage(machines, coverage)
    from conformance.allocator import SCENARIOS

    # The scripted scenarios, each on every machine with prefix caching (allocator.run_scenarios).
    run.targeted = len(SCENARIOS) * sum(c.enable_prefix_caching for c in configs.values())
    return run, None


# ----------------------------------------------------------------------------- 4. scheduler

def build_scheduler(ctx: Context):
    factory = ctx.hook("scheduler_factory")
    from conformance.scheduler_machine import ScenariosThenMachines, make_scheduler_machine
    from fast.core.policy import load_policy

    # `--policy`: the machine's model asks these policy objects (imported here, in the suite); the
    # scheduler under test gets them in its SchedulerConfig (imported again in the engine process).
    policies = [load_policy(spec) if ":" in spec else spec for spec in ctx.policies]
    # The scripted scenarios (rare situations, every run; their own built-in policies), then general
    # and memory-pressure configurations.
    return ScenariosThenMachines(factory, [make_scheduler_machine(factory, policies=policies)]), None


# ----------------------------------------------------------------------------- 5. sampler

def build_sampler(ctx: Context):
    """The engine's batched sampler vs the oracle's on logits built to sit on SPEC §6's edges
    (conformance/sampling.py): ties, all-negative rows, EOS on top, exact top-p/min-p cuts."""
    sample = ctx.hook("sample")
    from conformance.sampling import VOCAB, check_sampler, sampler_batches

    eos = ctx.rules.eos_token_ids or (2,)
    return sampler_batches(vocab=max(VOCAB, max(eos) + 1), eos=eos), lambda ctx, batch: check_sampler(sample, batch[0], batch[1], eos)


# ----------------------------------------------------------------------------- 6. end-to-end

def _requests(workload: Workload) -> list[tuple[list[int], SamplingParams]]:
    return [(p["prompt_token_ids"], params) for p, params in zip(workload.prompts, workload.params)]


def _compare(ctx: Context, workload: Workload, got: dict, dtype: str = "auto") -> dict:
    """Both sides obey SPEC's output rules on their own (conformance/contract.py: this catches a
    bug in the code fast shares with ref), then the engine equals the oracle run in the engine's
    `dtype`, under that dtype's tolerances, a divergence judged under the oracle's own token
    controls. Returns the oracle's outputs by request index."""
    from conformance.compare import oracle_controls
    from conformance.contract import check_output_contract as contract

    oracle = ctx.oracle_for(dtype)
    keep = sorted(got)
    expected = oracle.generate([workload.prompts[i] for i in keep], [workload.params[i] for i in keep])
    for side, outs in (("oracle", expected), ("engine", [got[i] for i in keep])):
        for i, out in zip(keep, outs):
            contract(workload.prompts[i]["prompt_token_ids"], workload.params[i], out, ctx.rules, f"{side} request {i}")
    e = oracle.llm.llm_engine
    check_request_outputs(e.model, e.model_config.eos_token_ids,
                          [(workload.prompts[i]["prompt_token_ids"], workload.params[i]) for i in keep],
                          expected, [got[i] for i in keep], dtype=e.model.dtype, controls_for=oracle_controls(e))
    return dict(zip(keep, expected))


TARGETED_OPTIONS = dict(max_model_len=MAX_MODEL_LEN, block_size=8, num_kv_blocks=64, max_num_seqs=8,
                        max_num_batched_tokens=64)


def _targeted_e2e_cases() -> list[tuple[Workload, dict]]:
    """Engine scenarios every run exercises: n > 1 samples forking off a prompt whose last block
    is partly filled (the child needs its own copy of it), in a pool where every fork fits..."""
    prompt = {"prompt_token_ids": list(range(3, 24))}  # 21 tokens: 2 full blocks of 8 + 5
    fork = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    options = TARGETED_OPTIONS
    # ... and a prompt computed in chunks of 8 tokens, with sampled and prompt logprobs and a
    # penalty (so that processed and raw logits differ)
    scored = SamplingParams(temperature=0, max_tokens=6, logprobs=3, prompt_logprobs=2, repetition_penalty=1.3)
    chunked = {**options, "max_num_batched_tokens": 8}
    # ... and a request aborted while it holds blocks: its 40-token prompt is computed in step 0,
    # it decodes in steps 1 and 2, and is aborted before step 3 (beside one that runs to the end)
    held = Workload([{"prompt_token_ids": list(range(40, 80))}, prompt],
                    [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                     SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)], [0, 0], {3: [0]})
    return [(Workload([prompt], [fork], [0]), options),
            (Workload([prompt, prompt], [fork, SamplingParams(temperature=0, max_tokens=8)], [0, 0]), options),
            (Workload([prompt], [scored], [0]), chunked),
            (held, options)]


def _half_precision_cases(vocab: int) -> list[tuple[Workload, dict]]:
    """The same workload in float16 and in bfloat16 (engine and oracle in that dtype): seeded
    samples truncated by top-p, top-k and min-p (the near-cut clause of the comparison), a greedy
    request, logprobs and prompt logprobs, under that dtype's tolerances."""
    gen = torch.Generator().manual_seed(2)
    prompts = [{"prompt_token_ids": torch.randint(3, vocab, (12 + 9 * i,), generator=gen).tolist()} for i in range(6)]
    # each truncation alone (so each one binds), then all three together
    params = [SamplingParams(temperature=1.0, top_k=3, seed=4, n=2, max_tokens=12, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=1.0, top_k=1, seed=7, n=2, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.8, seed=3, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.2, min_p=0.15, seed=5, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.6, top_p=0.9, top_k=20, min_p=0.05, seed=6, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, prompt_logprobs=2, ignore_eos=True)]
    workload = Workload(prompts, params, [0] * len(prompts))
    return [(workload, {**TARGETED_OPTIONS, "dtype": dtype}) for dtype in ("float16", "bfloat16")]


# Greedy under a strong repetition penalty (< 1 favours tokens already seen) after a prompt that
# holds EOS: a random model's greedy output meets EOS within a few tokens on about one prompt in
# three (EOS by itself is almost never a random model's argmax).
EOS_PARAMS = dict(temperature=0, max_tokens=8, repetition_penalty=0.2)


def _eos_prompts(ctx: Context, count: int, batch: int = 16, tries: int = 8) -> list[list[int]]:
    """Up to `count` prompts after which the greedy oracle under `EOS_PARAMS` emits EOS, found
    by running the oracle with ignore_eos on seeded random prompts that hold an EOS token. Only
    prompts whose EOS wins clear of the runner-up (far beyond the near-tie margin) are kept, so
    every correct engine stops there too; later EOS first."""
    from conformance.compare import oracle_decision_scores

    eos = ctx.rules.eos_token_ids
    if not eos:
        return []
    vocab = _vocab(ctx.model_dir)
    e = ctx.oracle.llm.llm_engine
    probe = SamplingParams(ignore_eos=True, **EOS_PARAMS)
    gen = torch.Generator().manual_seed(0)
    found: list[tuple[int, list[int]]] = []
    for _ in range(tries):
        prompts = [[eos[0]] + torch.randint(3, vocab, (int(torch.randint(4, 24, (1,), generator=gen)),),
                                            generator=gen).tolist() for _ in range(batch)]
        outs = ctx.oracle.generate([{"prompt_token_ids": p} for p in prompts], [probe] * batch)
        for prompt, out in zip(prompts, outs):
            ids = out.outputs[0].token_ids
            k = next((i for i, t in enumerate(ids) if t in eos), None)
            if k is None:
                continue
            top2 = torch.topk(oracle_decision_scores(e.model, prompt, ids, k, probe, tuple(eos), None), 2).values
            if float(top2[0] - top2[1]) > 0.05:
                found.append((k, prompt))
        if len(found) >= count:
            break
    return [prompt for _, prompt in sorted(found, key=lambda f: -f[0])[:count]]


def _stop_char(text: str) -> str | None:
    """The last printable ASCII character of `text` (not a space, not part of a character whose
    bytes are still incomplete), as a stop string that the text certainly contains."""
    return next((c for c in reversed(text) if c.isascii() and c.isprintable() and not c.isspace()), None)


def _stop_workloads(ctx: Context, count: int) -> list[Workload]:
    """`count` workloads each of whose requests ends on one stop kind, by construction from the
    greedy oracle's own output: a stop token the output contains, a stop string its text contains
    (kept in the output or cut, alternately), and EOS after a prompt whose greedy output meets EOS
    (`_eos_prompts`). A random model's outputs reach these on some draws only."""
    vocab = _vocab(ctx.model_dir)
    has_text = ctx.oracle.llm.llm_engine.codec.has_tokenizer
    gen = torch.Generator().manual_seed(1)
    greedy = dict(temperature=0, max_tokens=12, ignore_eos=True)
    candidates = [torch.randint(3, vocab, (int(torch.randint(4, 24, (1,), generator=gen)),), generator=gen).tolist()
                  for _ in range(4 * count)]
    probes = ctx.oracle.generate([{"prompt_token_ids": p} for p in candidates],
                                 [SamplingParams(**greedy)] * len(candidates))
    usable = [(p, o.outputs[0]) for p, o in zip(candidates, probes) if not has_text or _stop_char(o.outputs[0].text)]
    eos_prompts = _eos_prompts(ctx, count)
    workloads_ = []
    for i, (prompt, probe) in enumerate(usable[:count]):
        prompts = [{"prompt_token_ids": prompt}]
        params = [SamplingParams(stop_token_ids=[probe.token_ids[3]], **greedy)]
        if has_text:
            prompts.append({"prompt_token_ids": prompt})
            params.append(SamplingParams(stop=[_stop_char(probe.text)], include_stop_str_in_output=i % 2 == 1,
                                         **greedy))
        if i < len(eos_prompts):
            prompts.append({"prompt_token_ids": eos_prompts[i]})
            params.append(SamplingParams(**EOS_PARAMS))
        workloads_.append(Workload(prompts, params, [0] * len(prompts)))
    return workloads_


class _AbortProbe:
    """The engine, with each abort watched: an abort after which the engine's KV usage (its
    metrics) fell freed blocks the request held ("abort:blocks_held"). Metrics only add coverage."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.freed = engine, 0

    def abort_request(self, request_id) -> None:
        before = getattr(self.engine.get_metrics(), "kv_usage", 0.0)
        self.engine.abort_request(request_id)
        if getattr(self.engine.get_metrics(), "kv_usage", 0.0) < before:
            self.freed += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def build_e2e(ctx: Context):
    p = ctx.profile
    make_engine = getattr(ctx.adapter, "make_engine", None)
    kv_is_empty = getattr(ctx.adapter, "kv_is_empty", None)
    use_engine = make_engine is not None and getattr(ctx.adapter, "name", "") in ("fast", "fast-tp2")

    # An engine that declares requests unsupported or not comparable (the HF adapters) skips
    # whole features by design: its coverage is reported, not required.
    filtered = any(getattr(ctx.adapter, h, None) is not None for h in ("unsupported", "comparable"))
    minimums = e2e_minimums(p.name, engine_metrics=use_engine,
                            stop_string=ctx.oracle.llm.llm_engine.codec.has_tokenizer,
                            eos=bool(ctx.rules.eos_token_ids))
    coverage = Coverage(minimums={} if filtered else minimums)

    def body(ctx, case):
        workload, options = case
        features = option_features(options) | ({"abort"} if workload.aborts else set())
        if use_engine:
            engine = make_engine(**options)
            probe = _AbortProbe(engine)
            got = run_workload(probe, workload)  # checks every request finished, reported once
            if kv_is_empty is not None:
                assert kv_is_empty(engine), "KV blocks leaked after the workload finished"
            features |= metric_features(engine.get_metrics()) | ({"abort:blocks_held"} if probe.freed else set())
        else:
            workload = ctx.supported(workload, vs_oracle=True)
            outs = ctx.adapter.generate(workload.prompts, workload.params)
            check_outputs_complete(_requests(workload), outs)
            got = dict(enumerate(outs))
        _compare(ctx, workload, got, options.get("dtype", "auto"))  # features count only outputs that passed
        for i, out in got.items():
            features |= output_features(workload.prompts[i]["prompt_token_ids"], workload.params[i], out,
                                        MAX_MODEL_LEN, ctx.rules.eos_token_ids)
        coverage.record(features)

    body.coverage = coverage
    # Targeted cases first: paths a random draw reaches on some seeds only. Stop kinds for every
    # engine (PROFILE_SCALE workloads: their coverage minimums scale with the profile).
    targeted = [(w, TARGETED_OPTIONS if use_engine else {}) for w in _stop_workloads(ctx, PROFILE_SCALE.get(p.name, 1))]
    if use_engine:
        targeted = _targeted_e2e_cases() + _half_precision_cases(_vocab(ctx.model_dir)) + targeted
    run_targeted(ctx, body, targeted, "e2e")
    body.targeted = len(targeted)

    wl = workloads(max_requests=p.max_requests, max_prompt_len=80, max_tokens=16, max_model_len=MAX_MODEL_LEN)
    if use_engine:
        # The Triton backend on CPU runs in the interpreter, ~15x slower than torch: its examples
        # get small workloads (else a draw heavy in Triton examples outgrows the profile's budget).
        interpreted = not torch.cuda.is_available()
        small = workloads(max_requests=min(4, p.max_requests), max_prompt_len=80, max_tokens=16,
                          max_model_len=MAX_MODEL_LEN)
        # The backends the engine offers here (fast's C++ "cpu" kernel where it builds, on CPU).
        backends = tuple(sorted(getattr(ctx.adapter, "attention_backends", lambda: {"torch": None})()))
        policies = ctx.policies or ("fcfs", "priority")  # `module:attr` is imported by the engine's adapter
        return fast_engine_options(MAX_MODEL_LEN, variants=True, backends=backends, policies=policies).flatmap(
            lambda options: st.tuples(small if interpreted and options["attention_backend"] == "triton" else wl,
                                      st.just(options))), body
    return st.tuples(wl.map(lambda w: Workload(w.prompts, w.params, w.priorities, {})), st.just({})), body


def _limit_variants(tokens: list[int], text: str, has_text: bool) -> list[SamplingParams]:
    """Greedy requests whose stop conditions fall on the limits of a known greedy output `tokens`
    (of its max_tokens): a stop token on the last allowed token, and one just past it; a stop
    token masked by min_tokens up to the last token; a stop string ending the text, kept or cut;
    a stop string early in the text that min_tokens holds back until the last token."""
    m, last = len(tokens), tokens[-1]
    greedy = dict(temperature=0, ignore_eos=True)
    variants = [
        SamplingParams(max_tokens=m, stop_token_ids=[last], **greedy),
        SamplingParams(max_tokens=max(1, m - 1), stop_token_ids=[last], **greedy),
        SamplingParams(max_tokens=m, min_tokens=m, stop_token_ids=sorted(set(tokens)), **greedy),
        SamplingParams(max_tokens=m, min_tokens=max(0, m - 1), stop_token_ids=[last], **greedy),
    ]
    if has_text and text.strip():
        stop = text.rstrip()[-1]
        variants += [SamplingParams(max_tokens=m, stop=[stop], include_stop_str_in_output=keep, **greedy)
                     for keep in (False, True)]
        # The text's first character as a stop string, held back by min_tokens until the last token.
        variants.append(SamplingParams(max_tokens=m, min_tokens=m, stop=[text.strip()[0]], **greedy))
    return variants


def build_stops_at_the_limit(ctx: Context):
    """Stop tokens and strings on the last allowed token, min_tokens up to max_tokens, prompts at
    and near max_model_len: the engine's outputs equal the oracle's (SPEC §5)."""
    vocab = _vocab(ctx.model_dir)

    def body(ctx, case):
        prompt, max_tokens = case
        probe = ctx.oracle.generate([{"prompt_token_ids": prompt}],
                                    [SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)])[0]
        out = probe.outputs[0]
        params = _limit_variants(out.token_ids, out.text, ctx.oracle.llm.llm_engine.codec.has_tokenizer)
        workload = ctx.supported(Workload([{"prompt_token_ids": prompt}] * len(params), params,
                                          [0] * len(params), {}), vs_oracle=True)
        outs = ctx.adapter.generate(workload.prompts, workload.params)
        check_outputs_complete(_requests(workload), outs)
        _compare(ctx, workload, dict(enumerate(outs)))

    short = st.integers(1, 24)
    near = st.integers(MAX_MODEL_LEN - 17, MAX_MODEL_LEN)  # prompt + max_tokens around max_model_len
    prompts = st.one_of(short, near).flatmap(
        lambda n: st.lists(st.integers(3, vocab - 1), min_size=n, max_size=n))
    return st.tuples(prompts, st.integers(1, 16)), body


# ----------------------------------------------------------------------------- 7. determinism

def build_same_seed(ctx: Context):
    """Two engines built with the same seed give the same outputs — for seeded requests and, in
    about half the examples, for unseeded ones (their seeds come from the engine's seed)."""
    def body(ctx, case):
        workload, unseeded = case
        if unseeded:
            workload = Workload(workload.prompts, [_unseed(p) for p in workload.params], workload.priorities,
                                workload.aborts)
        workload = ctx.supported(workload)
        a = ctx.make_adapter(ctx.model_dir, seed=7, max_model_len=MAX_MODEL_LEN).generate(workload.prompts, workload.params)
        b = ctx.make_adapter(ctx.model_dir, seed=7, max_model_len=MAX_MODEL_LEN).generate(workload.prompts, workload.params)
        check_outputs_complete(_requests(workload), a)
        check_outputs_complete(_requests(workload), b)
        for x, y in zip(a, b):
            ta = [c.token_ids for c in x.outputs]
            tb = [c.token_ids for c in y.outputs]
            assert ta == tb, f"request {x.request_id}: two runs with seed 7 differ: {ta} vs {tb}"

    return st.tuples(workloads(max_requests=6, max_tokens=12, max_model_len=MAX_MODEL_LEN), st.booleans()), body


def _unseed(params: SamplingParams) -> SamplingParams:
    """The same request without its seed (a greedy one is left as it is)."""
    if params.seed is None or params.greedy:
        return params
    return SamplingParams(**{**params.__dict__, "seed": None})


def _reseeded(params: SamplingParams, shift: int) -> SamplingParams:
    """The same request with another seed (an unseeded one stays unseeded)."""
    if params.seed is None or shift == 0:
        return params
    return SamplingParams(**{**params.__dict__, "seed": (params.seed + shift) % 2**32})


def build_batch_invariance(ctx: Context):
    """A greedy or seeded request yields the same output alone or in any batch, at any position,
    whatever the other requests' seeds (SPEC §6)."""
    def body(ctx, case):
        workload, position, shift = case
        workload = ctx.supported(workload, vs_oracle=True)
        target = (workload.prompts[0], workload.params[0])
        alone = ctx.adapter.generate([target[0]], [target[1]])
        prompts, params = list(workload.prompts[1:]), [_reseeded(p, shift) for p in workload.params[1:]]
        k = min(position, len(prompts))
        prompts.insert(k, target[0])
        params.insert(k, target[1])
        together = ctx.adapter.generate(prompts, params)
        check_outputs_complete([(p["prompt_token_ids"], q) for p, q in zip(prompts, params)], together)
        e = ctx.oracle.llm.llm_engine
        # The request alone is the reference here; the oracle only arbitrates near-ties.
        check_request_outputs(e.model, e.model_config.eos_token_ids, [(target[0]["prompt_token_ids"], target[1])],
                              alone, [together[k]])

    # Positions uniform (Hypothesis' integers favour 0, which leaves the target first in its batch).
    positions = st.sampled_from(range(9))
    return st.tuples(workloads(max_requests=8, max_tokens=12), positions, st.sampled_from([0, 1, 9973])), body


# Unseeded sampling: equal requests draw different samples. With temperature 1 over a random
# model's next-token distribution, COPIES samples of TOKENS tokens all equal by chance is
# vanishingly unlikely; a draw all identical means the requests share one random stream.
UNSEEDED_COPIES, UNSEEDED_TOKENS = 4, 8


def build_unseeded_differ(ctx: Context):
    """Unseeded requests with the same prompt, in one call and across calls, do not produce
    identical samples (SPEC §6: each draws its own base seed from the engine's generator)."""
    vocab = _vocab(ctx.model_dir)

    def body(ctx, case):
        prompt, n = case
        params = SamplingParams(temperature=1.0, max_tokens=UNSEEDED_TOKENS, ignore_eos=True, n=n)
        adapter = ctx.adapter  # one engine for every example: its generator runs on, as a server's does
        if getattr(adapter, "unsupported", lambda p: None)(params) is not None:
            raise NotApplicable("the engine cannot run n > 1 unseeded requests")
        prompts = [{"prompt_token_ids": prompt}] * UNSEEDED_COPIES
        first = adapter.generate(prompts, [params] * UNSEEDED_COPIES)
        second = adapter.generate(prompts[:1], [params])
        check_outputs_complete([(prompt, params)] * UNSEEDED_COPIES, first)
        for i in range(n):
            copies = [out.outputs[i].token_ids for out in first]
            assert any(c != copies[0] for c in copies), (
                f"sample {i} of {UNSEEDED_COPIES} unseeded requests with prompt {prompt[:8]}... (n={n}) is the "
                f"same in each: {copies[0]}; the requests share one random stream")
        again = second[0].outputs[0].token_ids
        assert again != first[0].outputs[0].token_ids, (
            f"an unseeded request repeats in a second generate call: {again}; the engine's generator restarted")

    return st.tuples(st.lists(st.integers(3, vocab - 1), min_size=1, max_size=16), st.sampled_from([1, 2])), body


# ----------------------------------------------------------------------------- 8. robustness

def bad_requests(vocab: int, max_model_len: int, max_logprobs: int = 20) -> list[tuple[str, Any, Any]]:
    """(field the error must name, prompt, params) for every bad input of SPEC.md §4."""
    ok = {"prompt_token_ids": [5, 6, 7]}
    return [
        ("prompt", "", SamplingParams()),
        ("prompt_token_ids", {"prompt_token_ids": []}, SamplingParams()),
        ("prompt_token_ids", {"prompt_token_ids": [vocab]}, SamplingParams()),
        ("prompt_token_ids", {"prompt_token_ids": [-1]}, SamplingParams()),
        ("max_model_len", {"prompt_token_ids": [3] * (max_model_len + 1)}, SamplingParams()),
        ("logprobs", ok, SamplingParams(logprobs=max_logprobs + 1)),
        ("prompt_logprobs", ok, SamplingParams(prompt_logprobs=max_logprobs + 1)),
        ("stop_token_ids", ok, SamplingParams(stop_token_ids=[vocab + 3])),
        ("prompt", "ok \udc80 then", SamplingParams()),  # not valid Unicode
        ("n", ok, SamplingParams(n=DEFAULT_MAX_N + 1, temperature=1.0)),
        ("stop", ok, SamplingParams(stop=["s"] * (MAX_STOP_STRINGS + 1))),
        ("stop", ok, SamplingParams(stop=["x" * (MAX_STOP_STRING_CHARS + 1)])),
        ("stop_token_ids", ok, SamplingParams(stop_token_ids=[3] * (MAX_STOP_TOKEN_IDS + 1))),
        ("allowed_token_ids", ok, SamplingParams(allowed_token_ids=[3, vocab])),
        ("logit_bias", ok, SamplingParams(logit_bias={vocab + 1: 1.0})),
        ("bad_words", ok, SamplingParams(bad_words=["w"] * (MAX_BAD_WORDS + 1))),
        ("bad_words", ok, SamplingParams(bad_words=["w" * (MAX_BAD_WORD_CHARS + 1)])),
        ("structured_outputs", ok, SamplingParams(structured_outputs=StructuredOutputsParams(regex="(("))),
        ("structured_outputs", ok, SamplingParams(structured_outputs=StructuredOutputsParams(
            regex="a" * (MAX_STRUCTURED_CHARS + 1)))),
    ]


def build_bad_inputs(ctx: Context):
    vocab = _vocab(ctx.model_dir)
    cases = bad_requests(vocab, MAX_MODEL_LEN)
    good = {"prompt_token_ids": [5, 6, 7]}
    greedy = SamplingParams(temperature=0, max_tokens=4)

    def body(ctx, order):
        """Every bad request of SPEC §4, in a drawn order, to one engine that must keep serving."""
        adapter = ctx.make_adapter(ctx.model_dir, max_model_len=MAX_MODEL_LEN)
        for index in order:
            field_name, prompt, params = cases[index]
            try:
                adapter.generate([good, prompt], [greedy, params])
            except ValueError as err:
                assert field_name in str(err), f"error for bad {field_name} does not name it: {err}"
            except NotImplementedError as err:  # an engine that says it cannot express the field
                assert field_name in str(err), f"bad {field_name}: NotImplementedError not naming it: {err}"
            except Exception as err:  # noqa: BLE001 - any other exception type is the finding
                raise AssertionError(f"bad {field_name}: raised {type(err).__name__}, not ValueError: {err}") from err
            else:
                raise AssertionError(f"bad {field_name} ({str(prompt)[:60]}, {str(params)[:200]}) was accepted")
            out = adapter.generate([good], [greedy])  # keeps serving
            assert len(out[0].outputs[0].token_ids) == 4, "engine stopped serving after a rejected request"

    return st.permutations(range(len(cases))), body


def build_bad_params(ctx: Context):
    """SamplingParams violations are ValueErrors at construction (shared API, checked for all)."""
    bad = [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("min_p", 2.0), ("n", 0),
           ("presence_penalty", 3.0), ("repetition_penalty", 0.0), ("max_tokens", 0), ("stop", [""])]

    def body(ctx, index):
        name, value = bad[index]
        try:
            SamplingParams(**{name: value})
        except ValueError as err:
            assert name in str(err), f"error does not name {name}: {err}"
        else:
            raise AssertionError(f"SamplingParams({name}={value!r}) was accepted")

    return st.integers(0, len(bad) - 1), body


def build_abort_frees(ctx: Context):
    make_engine = ctx.hook("make_engine")
    kv_is_empty = ctx.hook("kv_is_empty")

    def body(ctx, case):
        workload, abort_after = case
        engine = make_engine(max_model_len=MAX_MODEL_LEN, block_size=4, num_kv_blocks=64, max_num_seqs=4)
        for i, (prompt, params) in enumerate(zip(workload.prompts, workload.params)):
            engine.add_request(str(i), prompt, params)
        for _ in range(abort_after):
            engine.step()
        engine.abort_request([str(i) for i in range(len(workload.prompts))])
        assert not engine.has_unfinished_requests(), "aborted requests still unfinished"
        assert kv_is_empty(engine), "aborting every request did not free every block"
        # The engine serves on: a fresh request, under an aborted one's id (a client retrying),
        # runs alone, and nothing aborted comes back to life (a sample left queued would be
        # admitted here and hold blocks for good; stale per-request state would meet the new one).
        engine.add_request("0", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2, temperature=0))
        outputs = {}
        for _ in range(64):
            for out in engine.step():
                outputs[out.request_id] = out
            if not engine.has_unfinished_requests():
                break
        assert set(outputs) == {"0"} and outputs["0"].finished, (
            f"after aborting everything, one fresh request gave outputs for {sorted(outputs)} "
            f"(finished: {[o.finished for o in outputs.values()]})")
        assert kv_is_empty(engine), "blocks held after the request that followed the aborts finished"

    return st.tuples(workloads(max_requests=6, max_tokens=12), st.integers(0, 6)), body


CHECKS = [
    Check("model", "logits_vs_transformers", build_logits_vs_hf),
    Check("model", "families_vs_transformers", build_families_vs_hf),
    Check("kernel", "paged_vs_dense", build_kernels),
    Check("allocator", "state_machine", build_allocator, stateful=True),
    Check("scheduler", "state_machine", build_scheduler, stateful=True),
    Check("sampler", "edges_vs_oracle", build_sampler, example_scale=25),
    Check("e2e", "workloads_vs_oracle", build_e2e),
    Check("e2e", "stops_at_the_limit", build_stops_at_the_limit),
    Check("determinism", "same_seed_same_output", build_same_seed),
    Check("determinism", "batch_invariance", build_batch_invariance),
    Check("determinism", "unseeded_requests_differ", build_unseeded_differ),
    Check("robustness", "bad_requests_rejected", build_bad_inputs),
    Check("robustness", "bad_sampling_params", build_bad_params),
    Check("robustness", "abort_frees_everything", build_abort_frees),
    Check("structured", "constraints_vs_oracle", build_structured),
]
