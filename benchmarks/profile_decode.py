"""Profile one decode step of `fast` at batch 64 on the offline model: where the time goes.

    python -m benchmarks.profile_decode [--steps 10]

Prints torch.profiler's operator table (self CPU time) and the share of GEMMs (aten::addmm,
aten::mm, aten::linear) against everything else, for the README's performance section.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.workloads import model_dir, offline


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    from fast import EngineConfig, LLMEngine

    workload = offline("full")
    engine = LLMEngine(EngineConfig(model=model_dir("full"), max_model_len=1024, attention_backend="torch"))
    for i, (prompt, params) in enumerate(zip(workload.prompts, workload.params)):
        params.max_tokens = 1000  # keep all 64 decoding while profiling
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
        engine.step()
    assert len(engine.scheduler.running) == 64
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    step_s = (time.perf_counter() - t0) / args.steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            engine.step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul"))
    print(f"decode step at batch 64: {step_s * 1e3:.1f} ms; GEMMs {100 * gemm / total:.0f}% of profiled op time")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
