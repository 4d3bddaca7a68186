"""End-to-end engine benchmarks: peers side by side on the standard workloads (one run each).

    make bench            # full size, saved with --benchmark-autosave
    pytest benchmarks --benchmark-disable   # smoke: tiny workloads, proves the suite runs

extra_info of every run: output/total tok/s, TTFT/TPOT p50/p99, KV utilization, max concurrent
requests, preemptions, prefix hit rate, and the roofline figures (achieved FLOP/s / fp32 GEMM
peak, wall time / GEMM floor) measured in the same session.

fast runs with its default attention backend (`auto`: what a user gets; the row is named
`fast`); `fast-torch` pins the torch fallback backend. The GEMM floor and the fp32 peak use the
fastest GEMM this torch offers for each shape (harness.gemm_impls: F.linear, oneDNN with a
prepacked weight, MKL packed), timed on the checkpoint's weights independently of fast's layers;
gemm_floor_impl says which set the floor, gemm_floor_by_impl_s what each alone would give.

Memory: fast gets MEMORY_BUDGET_SLOTS token slots of KV; beside its measured concurrency stand
the vLLM paper's contiguous baselines at the same slots (harness.orca_baselines: Orca-Max
reserves max_model_len per request, Orca-Pow2 the next power of two, Orca-Oracle prompt +
max_tokens), computed from the workload, and how kv_utilization is made (harness.KVMonitor).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import harness
from benchmarks.workloads import WORKLOADS


@pytest.fixture(scope="session")
def roofline(bench_model, scale) -> dict:
    """Peak, FLOPs and GEMM floor of the offline workload (floor replays fast's own schedule)."""
    workload = WORKLOADS["offline"](scale)
    fast_run = harness.run_fast(bench_model, workload)  # the schedule does not depend on the backend
    floor = harness.gemm_floor(bench_model, fast_run.step_tokens, reps=1 if scale == "smoke" else 3)
    peak = harness.matmul_peak(512 if scale == "smoke" else 2048)
    return {"peak_flops": peak.flops, "peak_flops_impl": peak.impl,
            "model_flops": harness.model_flops(bench_model, workload), **floor.info()}


def _record(benchmark, result: harness.RunResult, roof: dict | None = None) -> None:
    info = result.extra_info()
    if roof is not None:
        info.update(roof)
        info["flops_fraction_of_peak"] = roof["model_flops"] / result.wall_s / roof["peak_flops"]
        info["time_over_gemm_floor"] = result.wall_s / roof["gemm_floor_s"]
    benchmark.extra_info.update(info)


OFFLINE_ENGINES = {
    "fast": lambda m, w: harness.run_fast(m, w),
    "fast-torch": lambda m, w: harness.run_fast(m, w, attention_backend="torch"),
    "ref": lambda m, w: harness.run_ref(m, w),
    "hf-generate": lambda m, w: harness.run_hf_generate(m, w),
    "hf-generate_batch": lambda m, w: harness.run_hf_generate_batch(m, w),
}
if torch.cuda.is_available():
    OFFLINE_ENGINES["fast-triton"] = lambda m, w: harness.run_fast(m, w, attention_backend="triton")


@pytest.mark.parametrize("engine", sorted(OFFLINE_ENGINES))
def test_offline(benchmark, bench_model, scale, roofline, engine):
    workload = WORKLOADS["offline"](scale)
    benchmark.group = "offline"
    result = benchmark.pedantic(OFFLINE_ENGINES[engine], args=(bench_model, workload), rounds=1, iterations=1)
    _record(benchmark, result, roofline)


@pytest.mark.parametrize("caching", [True, False], ids=["prefix-cache-on", "prefix-cache-off"])
def test_shared_prefix(benchmark, bench_model, scale, caching):
    workload = WORKLOADS["shared-prefix"](scale)
    benchmark.group = "shared-prefix"
    result = benchmark.pedantic(harness.run_fast, args=(bench_model, workload),
                                kwargs=dict(enable_prefix_caching=caching),
                                rounds=1, iterations=1)
    _record(benchmark, result)
    benchmark.extra_info["prompt_tokens_computed_fraction"] = 1 - (result.prefix_hit_rate or 0.0)


@pytest.mark.parametrize("engine", ["fast-chunked", "fast-unchunked", "ref"])
def test_long_context(benchmark, bench_model, scale, engine):
    workload = WORKLOADS["long-context"](scale)
    benchmark.group = "long-context"
    if engine == "ref":
        fn, kwargs = harness.run_ref, {}
    else:
        fn = harness.run_fast
        kwargs = dict(enable_chunked_prefill=engine == "fast-chunked",
                      max_num_batched_tokens=512 if engine == "fast-chunked" else workload.max_model_len)
    result = benchmark.pedantic(fn, args=(bench_model, workload), kwargs=kwargs, rounds=1, iterations=1)
    _record(benchmark, result)


MEMORY_BUDGET_SLOTS = 8192  # KV token slots both engines get in the memory workload


@pytest.mark.parametrize("engine", ["fast", "ref"])
def test_memory(benchmark, bench_model, scale, engine):
    """Equal KV memory: fast gets MEMORY_BUDGET_SLOTS / block_size blocks; ref gets as many rows as
    fit when each row reserves prompt + max_tokens of the workload's longest request (a uniform
    contiguous reservation). Every row also carries the Orca baselines at the same slots."""
    workload = WORKLOADS["memory"](scale)
    benchmark.group = "memory"
    budget = MEMORY_BUDGET_SLOTS if scale == "full" else 1024
    if engine == "fast":
        kwargs = dict(block_size=16, num_kv_blocks=budget // 16, max_num_seqs=256)
        fn = harness.run_fast
    else:
        longest = max(len(p) + m for p, m in zip(workload.prompts, workload.max_tokens))
        kwargs = dict(max_batch=max(1, budget // longest))
        fn = harness.run_ref
    result = benchmark.pedantic(fn, args=(bench_model, workload), kwargs=kwargs, rounds=1, iterations=1)
    _record(benchmark, result)
    orca = harness.orca_baselines(workload, budget)
    benchmark.extra_info["kv_budget_slots"] = budget
    benchmark.extra_info.update(orca)
    sat = (result.kv_stats or {}).get("concurrency_saturated_mean")
    for base in ("orca_max", "orca_oracle"):
        if result.mean_concurrent is not None:
            benchmark.extra_info[f"concurrency_mean_over_{base}"] = result.mean_concurrent / orca[f"{base}_concurrency_mean"]
        if sat is not None and orca[f"{base}_concurrency_saturated_mean"]:
            benchmark.extra_info[f"concurrency_saturated_over_{base}"] = sat / orca[f"{base}_concurrency_saturated_mean"]
        benchmark.extra_info[f"concurrency_max_over_{base}"] = result.max_concurrent / orca[f"{base}_concurrency_max"]
