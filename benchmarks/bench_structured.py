"""Structured output on the offline workload: constrained vs unconstrained decode at batch 64 (issue #16).

    .venv/bin/python -m pytest benchmarks/bench_structured.py -p no:xdist   # full size
    pytest benchmarks --benchmark-disable                                  # smoke: tiny, proves it runs

`fast` serves the offline workload (benchmarks/workloads.py: 64 requests, prompts 16-256 tokens,
max_tokens 16-128, greedy) on the benchmark model with its tokenizer (a constraint is over text:
`workloads.structured_model_dir`) under each of VARIANTS: unconstrained, a JSON schema of 5
properties (`workloads.STRUCTURED_SCHEMA`), any JSON object, and a regex (an e-mail address).
ignore_eos=False everywhere and the workload's max_tokens: a constrained output ends at EOS once
its sentence is complete and the model picks EOS. The random-init model never completed a
schema instance and rarely an address (those runs make about as many tokens as the
unconstrained one), but completed about half of its "any object" outputs early, so that run's
batches shrink sooner: compare it per step at equal rows (below), not per token.

`test_constrained_vs_unconstrained`: one engine (prefix caching off, so no round reuses another's
KV) serves every variant; a warm-up round (not timed: it also compiles each constraint once),
then ROUNDS rounds in which the variants take turns (the order rotating), on one torch thread,
timed in this thread's CPU time (the machine is shared; CPU time of one thread stays repeatable
under load). Each variant keeps its best round. Per engine step: its CPU time, the bitmask fill
(`StructuredOutputManager.grammar_bitmask`, wrapped from outside) and the mask application in the
sampler (`Sampler._apply_masks`: with no other token controls in these requests, exactly the
grammar mask's unpack and masked_fill), and the step's tokens and logits rows (the executor,
wrapped as `harness.record_steps` does). extra_info, per variant: cpu_s (all steps),
output_tokens, cpu_ms_per_output_token, finish reasons, steps; fill_s, apply_s and
mask_share = (fill + apply) / cpu_s over the whole run, and the same over decode-only steps
(every scheduled token a logits row; decode_step_ms); the manager's own fill_time_s (wall) beside
ours; and, for a constrained variant, against the unconstrained run of the same process and
rounds: cpu_per_token_over_unconstrained (CPU per output token ÷ the unconstrained run's; only
comparable where both made about as many tokens, since a smaller batch costs more per token) and
decode_step_over_unconstrained_equal_rows (decode-step CPU ÷ the unconstrained run's mean at the
same number of rows). The issue's target: mask cost <= 10 % of step time.

Outputs that finished by EOS are checked against the constraint (jsonschema, re.fullmatch): a
sanity check that the variant was constrained, not a proof (the conformance `structured` tier is).

`test_schema_compile`: compile time of each constraint on a fresh `StructuredOutputManager`
(fast's compile cache, keyed by the constraint): `cold` = the first compile (the grammar
vocabulary and compiler are built beforehand by a trivial constraint, reported as
vocabulary_build_s), `cached` = the same constraint again (a cache hit: num_compiles must not
move). The benchmark's own stats are wall time; extra_info adds CPU time (process_time: xgrammar's
compiler runs on threads of its own).
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch

from benchmarks.workloads import (
    STRUCTURED_REGEX, STRUCTURED_SCHEMA, WORKLOADS, Workload, structured_model_dir,
)
from ref.sampling_params import SamplingParams, StructuredOutputsParams

VARIANTS: dict[str, StructuredOutputsParams | None] = {
    "unconstrained": None,
    "json-schema": StructuredOutputsParams(json=STRUCTURED_SCHEMA),
    "json-object": StructuredOutputsParams(json_object=True),
    "regex": StructuredOutputsParams(regex=STRUCTURED_REGEX),
}
ROUNDS = {"full": 2, "smoke": 1}
COMPILE_ROUNDS = {"full": 5, "smoke": 1}
thread_cpu = time.thread_time


@pytest.fixture(scope="module")
def structured_model(scale) -> str:
    return structured_model_dir(scale)


# ----------------------------------------------------------------------------- probes

@dataclass
class Step:
    cpu_s: float = 0.0
    fill_s: float = 0.0
    apply_s: float = 0.0
    tokens: int = 0  # tokens through the model
    rows: int = 0  # logits rows (samples that sample)
    constrained_rows: int = 0


class MaskProbe:
    """Per engine step: thread CPU time of the step, of the bitmask fill and of the sampler's
    mask application, and the step's token counts; installed once on an in-process engine."""

    def __init__(self, engine):
        self.steps: list[Step] = []
        self.current = Step()
        self._wrap(engine.structured, "grammar_bitmask", "fill_s")
        self._wrap(engine.executor.driver_worker.model_runner.sampler, "_apply_masks", "apply_s")
        execute = engine.executor.execute_model

        def execute_model(scheduler_output):
            runner_output = execute(scheduler_output)
            self.current.tokens = scheduler_output.total_num_scheduled_tokens
            self.current.rows = len(runner_output.req_ids)
            self.current.constrained_rows = len(scheduler_output.structured_req_ids or ())
            return runner_output

        engine.executor.execute_model = execute_model

    def _wrap(self, obj, method: str, slot: str) -> None:
        inner = getattr(obj, method)

        def timed(*args, **kwargs):
            t0 = thread_cpu()
            try:
                return inner(*args, **kwargs)
            finally:
                setattr(self.current, slot, getattr(self.current, slot) + thread_cpu() - t0)

        setattr(obj, method, timed)

    def step(self, engine) -> list:
        """engine.step_finished() (what LLM.generate calls), recorded."""
        self.current = Step()
        t0 = thread_cpu()
        outs = engine.step_finished()
        self.current.cpu_s = thread_cpu() - t0
        if self.current.rows:
            self.steps.append(self.current)
        return outs


# ----------------------------------------------------------------------------- one run

@dataclass
class Run:
    variant: str
    steps: list[Step]
    outputs: dict = field(default_factory=dict)  # request id -> RequestOutput
    fill_wall_s: float = 0.0  # the manager's own fill_time_s over this run

    @property
    def cpu_s(self) -> float:
        return sum(s.cpu_s for s in self.steps)

    def info(self) -> dict:
        tokens = sum(len(o.outputs[0].token_ids) for o in self.outputs.values())
        decode = [s for s in self.steps if s.tokens == s.rows]
        total = lambda xs, k: sum(getattr(s, k) for s in xs)  # noqa: E731
        cpu, fill, apply = total(self.steps, "cpu_s"), total(self.steps, "fill_s"), total(self.steps, "apply_s")
        dcpu, dfill, dapply = total(decode, "cpu_s"), total(decode, "fill_s"), total(decode, "apply_s")
        return {
            "variant": self.variant, "cpu_s": cpu, "output_tokens": tokens, "steps": len(self.steps),
            "decode_steps": len(decode), "max_rows": max((s.rows for s in self.steps), default=0),
            "cpu_ms_per_output_token": 1e3 * cpu / tokens if tokens else None,
            "finish_reasons": dict(Counter(o.outputs[0].finish_reason for o in self.outputs.values())),
            "constrained_rows": total(self.steps, "constrained_rows"),
            "fill_s": fill, "apply_s": apply, "mask_share": (fill + apply) / cpu if cpu else None,
            "fill_wall_s_manager": self.fill_wall_s,
            "decode_step_ms": 1e3 * dcpu / len(decode) if decode else None,
            "decode_fill_ms": 1e3 * dfill / len(decode) if decode else None,
            "decode_apply_ms": 1e3 * dapply / len(decode) if decode else None,
            "decode_mask_share": (dfill + dapply) / dcpu if dcpu else None,
        }


def serve(engine, probe: MaskProbe, workload: Workload, variant: str, id_prefix: str) -> Run:
    so = VARIANTS[variant]
    fill_before, first_step = engine.structured.fill_time_s, len(probe.steps)
    for i, (prompt, max_tokens) in enumerate(zip(workload.prompts, workload.max_tokens)):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=False, structured_outputs=so)
        engine.add_request(f"{id_prefix}{i}", {"prompt_token_ids": prompt}, params)
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in probe.step(engine))
    return Run(variant, probe.steps[first_step:], outputs, engine.structured.fill_time_s - fill_before)


def decode_ratio_at_equal_rows(run: Run, base: Run) -> float | None:
    """Σ CPU of `run`'s decode steps ÷ Σ of the base run's mean decode-step CPU at the same number
    of rows, over the steps whose row count the base run also had: the per-step cost compared at
    equal batch, even where early EOS made the two runs' batches shrink differently."""
    by_rows: dict[int, list[float]] = {}
    for s in base.steps:
        if s.tokens == s.rows:
            by_rows.setdefault(s.rows, []).append(s.cpu_s)
    mine = [s for s in run.steps if s.tokens == s.rows and s.rows in by_rows]
    expected = sum(statistics.mean(by_rows[s.rows]) for s in mine)
    return sum(s.cpu_s for s in mine) / expected if expected else None


def check_outputs(run: Run) -> int:
    """Every output that ended by EOS satisfies its constraint; returns how many did."""
    import jsonschema

    so = VARIANTS[run.variant]
    complete = [o.outputs[0].text for o in run.outputs.values() if o.outputs[0].finish_reason == "stop"]
    for text in complete if so is not None else []:
        if so.kind == "regex":
            assert re.fullmatch(so.regex, text), f"{run.variant}: {text!r} does not match {so.regex!r}"
        else:
            value = json.loads(text)
            jsonschema.validate(value, so.json if so.kind == "json" else {"type": "object"})
    return len(complete)


# ----------------------------------------------------------------------------- the benchmarks

def test_constrained_vs_unconstrained(benchmark, structured_model, scale):
    from fast import EngineConfig, LLMEngine

    workload = WORKLOADS["offline"](scale)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = LLMEngine(EngineConfig(model=structured_model, max_model_len=workload.max_model_len,
                                        enable_prefix_caching=False))
        probe = MaskProbe(engine)
        names = list(VARIANTS)
        for name in names:  # warm-up: compiles each constraint once, touches every code path
            serve(engine, probe, workload, name, f"warm-{name}-")
        runs: dict[str, list[Run]] = {name: [] for name in names}

        def one_round():
            k = len(runs[names[0]])
            for name in names[k % len(names):] + names[:k % len(names)]:
                runs[name].append(serve(engine, probe, workload, name, f"r{k}-{name}-"))

        benchmark.group = "structured: offline, batch 64"
        benchmark.pedantic(one_round, rounds=ROUNDS[scale], iterations=1)
        engine.shutdown()
    finally:
        torch.set_num_threads(threads)

    best = {name: min(rs, key=lambda r: r.cpu_s) for name, rs in runs.items()}
    info = {name: run.info() for name, run in best.items()}
    base = info["unconstrained"]
    for name, row in info.items():
        row["complete_and_valid"] = check_outputs(best[name])
        if VARIANTS[name] is None:
            assert row["constrained_rows"] == 0 and row["fill_s"] == 0.0, "an unconstrained run filled a bitmask"
            continue
        assert row["constrained_rows"] > 0, f"{name}: no step filled a bitmask"
        if row["cpu_ms_per_output_token"] and base["cpu_ms_per_output_token"]:
            row["cpu_per_token_over_unconstrained"] = row["cpu_ms_per_output_token"] / base["cpu_ms_per_output_token"]
        row["decode_step_over_unconstrained_equal_rows"] = decode_ratio_at_equal_rows(best[name], best["unconstrained"])
    benchmark.extra_info.update({"model": structured_model, "workload": workload.name, "threads": 1,
                                 "timer": "thread_time", "rounds": ROUNDS[scale], "variants": info})


COMPILE_CASES = {name: so for name, so in VARIANTS.items() if so is not None}


@pytest.mark.parametrize("cache", ["cold", "cached"])
@pytest.mark.parametrize("constraint", list(COMPILE_CASES))
def test_schema_compile(benchmark, structured_model, scale, constraint, cache):
    from fast.core.structured_output import StructuredOutputManager
    from ref.config import ModelConfig
    from ref.tokenizer import load_tokenizer

    so = COMPILE_CASES[constraint]
    config = ModelConfig.from_pretrained(structured_model)
    tokenizer = load_tokenizer(structured_model)
    cpu: list[float] = []
    vocab_build: list[float] = []

    def fresh_manager():
        manager = StructuredOutputManager(tokenizer, config.vocab_size, config.eos_token_ids)
        t0 = time.process_time()
        manager.compile(StructuredOutputsParams(choice=["a"]))  # builds the vocabulary and the compiler
        vocab_build.append(time.process_time() - t0)
        if cache == "cached":
            manager.compile(so)
        return (manager, manager.num_compiles), {}

    def compile_once(manager, compiles_before):
        t0 = time.process_time()
        manager.compile(so)
        cpu.append(time.process_time() - t0)
        assert manager.num_compiles == compiles_before + (cache == "cold"), "the compile cache missed or was bypassed"

    benchmark.group = "structured: compile"
    benchmark.pedantic(compile_once, setup=fresh_manager, rounds=COMPILE_ROUNDS[scale], iterations=1)
    benchmark.extra_info.update({"constraint": constraint, "cache": cache, "vocab_size": config.vocab_size,
                                 "cpu_s_min": min(cpu), "cpu_s_median": statistics.median(cpu),
                                 "vocabulary_build_s": min(vocab_build)})
