"""Tensor parallelism: fast with tensor_parallel_size=2 vs 1 on the offline workload (one run each).

    pytest benchmarks/bench_tp.py -p no:xdist                 # full size (the ~30M-param model)
    pytest benchmarks/bench_tp.py --benchmark-disable         # smoke: tiny model and workload

Variants, all with the torch attention backend:
- `tp1`:         one rank in this process (the `uni` executor), on this process's torch threads
                 (one per core unless OMP_NUM_THREADS says otherwise);
- `tp1-1thread`: the same on one torch thread;
- `tp1-mp`:      one rank in a worker process (`mp`, cpus torch threads): the pipe to a worker,
                 without any collective;
- `tp2-mp`:      two ranks in two worker processes (cpus // 2 threads each), gloo on CPU (NCCL on
                 CUDA): two all-reduces per layer and a logits gather every step, on top of the pipes.

Read the numbers for what they are. On a CPU machine the ranks share the same cores, so TP=2 does
the same arithmetic in two halves plus the collectives; it proves that the sharded engine runs the
standard workload end to end (tests/test_distributed.py proves its outputs equal TP=1's), not that
TP is faster. What dominates on a small shared machine is threading: several torch threads per
process spin against each other and against other processes' work (OpenMP's idle threads spin
between parallel regions), while two one-thread ranks do not; compare `tp2-mp` with
`tp1-1thread`, not only with `tp1`. TP pays off when each rank has its own accelerator and the
model (or its KV cache) does not fit one.

Engine start-up (worker processes, model load) is outside the timed run and recorded as
`startup_s`; each engine first serves a 2-token warm-up request (first-call costs out of the
timing, alike for every variant) and is shut down afterwards. extra_info: the harness figures
(tok/s, TTFT/TPOT, preemptions, prefix hits) plus tensor_parallel_size, executor, the torch threads
of each rank, and `wall_vs_tp1` / `wall_vs_tp1_1thread` (this variant's wall time over theirs;
they run first).

Measured once at full size on the 2 shared, busy cores of the development machine (load 4-9):
tp1 139 s, tp1-1thread 20.4 s, tp1-mp 172 s, tp2-mp 25.6 s: TP=2 took 1.26x the time of TP=1 on
one thread (the collectives and pipes), while both two-thread runs were ~7x slower than either.
"""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks import harness
from benchmarks.workloads import WORKLOADS, Workload, model_dir
from fast.executor.multiproc import worker_threads
from ref.sampling_params import SamplingParams

VARIANTS = {  # name -> (tensor_parallel_size, distributed_executor_backend, torch threads of a uni run)
    "tp1": (1, "uni", None),  # this process's threads as they are (one per core by default)
    "tp1-1thread": (1, "uni", 1),
    "tp1-mp": (1, "mp", None),
    "tp2-mp": (2, "mp", None),
}
_WALL: dict[str, float] = {}  # variant -> wall time of its timed run (for wall_vs_tp1)


def run_tp(model: str, workload: Workload, tensor_parallel_size: int, backend: str,
           threads: int | None = None) -> harness.RunResult:
    if threads is not None:  # a uni run on `threads` torch threads of this process
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run_tp(model, workload, tensor_parallel_size, backend)
        finally:
            torch.set_num_threads(before)
    from fast import EngineConfig, LLMEngine

    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=model, max_model_len=workload.max_model_len, attention_backend="torch",
                                    tensor_parallel_size=tensor_parallel_size,
                                    distributed_executor_backend=backend))
    startup = time.perf_counter() - t0
    try:
        engine.add_request("warm-up", {"prompt_token_ids": workload.prompts[0][:8]},
                           SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        before = engine.get_metrics()
        wall, ttft, tpot = harness._drive(engine, workload)
        m = engine.get_metrics()
    finally:
        engine.shutdown()
    result = harness.RunResult(f"fast[tp={tensor_parallel_size},{backend}]", workload.name, wall,
                               workload.num_output_tokens, workload.num_prompt_tokens, ttft, tpot,
                               preemptions=m.num_preemptions - before.num_preemptions,
                               prefix_hit_rate=m.prefix_cache_hit_rate)
    result.startup_s = startup
    return result


@pytest.mark.parametrize("variant", list(VARIANTS))  # tp1 first: the others are compared with it
def test_offline_tp(benchmark, scale, variant):
    tp, backend, threads = VARIANTS[variant]
    workload = WORKLOADS["offline"](scale)
    benchmark.group = "offline-tp"
    result = benchmark.pedantic(run_tp, args=(model_dir(scale), workload, tp, backend, threads),
                                rounds=1, iterations=1)
    assert result.output_tokens == workload.num_output_tokens
    _WALL[variant] = result.wall_s
    benchmark.extra_info.update(result.extra_info())
    benchmark.extra_info.update(
        tensor_parallel_size=tp, executor=backend, startup_s=result.startup_s,
        torch_threads_per_rank=(threads or torch.get_num_threads()) if backend == "uni" else worker_threads(tp),
        **{f"wall_vs_{base.replace('-', '_')}": result.wall_s / _WALL[base] if base in _WALL else None
           for base in ("tp1", "tp1-1thread")})
