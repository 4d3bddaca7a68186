"""What the step tracer costs: nothing when off, a measured fraction of a step when on.

    pytest benchmarks/bench_trace.py --benchmark-only      # full size (~1-2 min on 2 cores)

Tracing off, the engine's step pays four `tracer is not None` checks and nothing else: the inner
layers are timed by wrapping their instances only when tracing is on (fast/trace/tracer.py), so
an untraced engine runs exactly the untraced code. Two figures show it in one run:

- `off_hook_ns_per_step`: the four checks themselves, timed in a loop on a real engine (the same
  expression the engine evaluates), and `off_hook_share_of_step` = that / the step time of the
  untraced run: the whole possible cost of the hooks when off.
- `on_over_off` / `file_over_off`: thread CPU time per step with tracing on (records in memory;
  records also written as JSON lines) over tracing off, median of 5 interleaved rounds so that
  every mode sees the same load. CPU time of one torch thread, not wall: robust to other
  processes on a shared machine.

The workload: the first 16 requests of the standard `offline` workload (prompts 16-256 tokens,
outputs capped at 32), greedy, on the ~30M-param benchmark model. Under --benchmark-disable (CI)
a smoke-size run checks that the three modes give identical outputs.
"""

from __future__ import annotations

import statistics
import time
import timeit

import pytest
import torch

from benchmarks.workloads import WORKLOADS
from fast import EngineConfig, LLMEngine, SamplingParams

MODES = ("off", "memory", "file")


def _requests(scale: str):
    w = WORKLOADS["offline"](scale)
    n = 16 if scale == "full" else len(w.prompts)
    return w, [(p, SamplingParams(temperature=0.0, max_tokens=min(m, 32), ignore_eos=True))
               for p, m in zip(w.prompts[:n], w.max_tokens[:n])]


def _run(engine: LLMEngine, requests, tag: str) -> tuple[float, int, dict]:
    """(thread CPU seconds, steps, outputs) of the requests run to completion."""
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": prompt}, params)
    outputs, steps = {}, 0
    t0 = time.thread_time()
    while engine.has_unfinished_requests():
        for out in engine.step_finished():
            outputs[out.request_id.split("-", 1)[1]] = [c.token_ids for c in out.outputs]
        steps += 1
    return time.thread_time() - t0, steps, outputs


def _hook_seconds_per_step(engine: LLMEngine, reps: int = 200_000) -> float:
    """The four checks an untraced step evaluates (fast/engine/llm_engine.py `_step`)."""
    def step_hooks(engine=engine):
        tracer = engine.tracer
        if tracer is not None:
            raise AssertionError("tracing is on")
        if tracer is not None:
            pass
        if tracer is not None:
            pass
        if tracer is not None:
            pass
    return min(timeit.repeat(step_hooks, number=reps, repeat=5)) / reps


def test_trace_cost(benchmark, bench_model, scale, tmp_path):
    workload, requests = _requests(scale)
    engines = {mode: LLMEngine(EngineConfig(model=bench_model, max_model_len=workload.max_model_len,
                                            trace={"off": False, "memory": True, "file": str(tmp_path / "t.jsonl")}[mode]))
               for mode in MODES}
    rounds = 5 if scale == "full" else 1
    cpu = {mode: [] for mode in MODES}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thread CPU time then counts all of a step's work
    results = {}
    for r in range(rounds):
        for mode in MODES:  # interleaved: every mode sees the same load
            seconds, steps, outputs = _run(engines[mode], requests, f"{mode}{r}")
            cpu[mode].append(seconds / steps)
            results.setdefault(mode, outputs)
    torch.set_num_threads(threads)
    assert results["memory"] == results["off"] == results["file"]  # tracing changes no output

    engine = engines["off"]
    benchmark.pedantic(lambda: _run(engine, requests, f"bench{time.perf_counter_ns()}"), rounds=1, iterations=1)
    off = statistics.median(cpu["off"])
    hook = _hook_seconds_per_step(engine)
    benchmark.extra_info.update({
        "steps": steps, "off_cpu_ms_per_step": 1e3 * off,
        "on_over_off": statistics.median(cpu["memory"]) / off,
        "file_over_off": statistics.median(cpu["file"]) / off,
        "off_hook_ns_per_step": 1e9 * hook, "off_hook_share_of_step": hook / off,
        "records": len(engines["memory"].tracer.records),
    })
    for e in engines.values():
        e.shutdown()


if __name__ == "__main__":  # a quick look without pytest-benchmark
    pytest.main([__file__, "-q", "--benchmark-only", "--benchmark-columns=mean", "-s"])
