"""Run one workload through one engine and measure it; plus the roofline references.

Every engine is timed end to end (prefill included) on the same prompts. Engines with a
`step()` API (fast, ref) are driven step by step so that TTFT/TPOT per request are observed;
HF `generate` (static padded batches) and `generate_batch` (continuous batching) run whole.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.workloads import Workload


@dataclass
class RunResult:
    engine: str
    workload: str
    wall_s: float
    output_tokens: int
    prompt_tokens: int
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    kv_utilization: float | None = None  # fraction of allocated KV slots holding tokens (KVMonitor)
    max_concurrent: int | None = None
    preemptions: int | None = None
    prefix_hit_rate: float | None = None
    step_tokens: list[tuple[int, int]] = field(default_factory=list)  # (tokens, logits rows) per step
    mean_concurrent: float | None = None
    kv_stats: dict = field(default_factory=dict)  # KVMonitor.stats(): how kv_utilization comes about

    def extra_info(self) -> dict:
        pct = lambda xs, q: (statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else (xs[0] if xs else None))  # noqa: E731
        return {
            "engine": self.engine, "workload": self.workload, "wall_s": self.wall_s,
            "output_tok_s": self.output_tokens / self.wall_s,
            "total_tok_s": (self.output_tokens + self.prompt_tokens) / self.wall_s,
            "ttft_p50_s": pct(self.ttft_s, 50), "ttft_p99_s": pct(self.ttft_s, 99),
            "tpot_p50_s": pct(self.tpot_s, 50), "tpot_p99_s": pct(self.tpot_s, 99),
            "kv_utilization": self.kv_utilization, "max_concurrent": self.max_concurrent,
            "mean_concurrent": self.mean_concurrent,
            "preemptions": self.preemptions, "prefix_hit_rate": self.prefix_hit_rate,
            **self.kv_stats,
        }


def _drive(engine, workload: Workload, on_step=None, id_prefix: str = ""):
    """Add every request, step until done; returns (wall, ttft list, tpot list)."""
    t0 = time.perf_counter()
    for i, (prompt, params) in enumerate(zip(workload.prompts, workload.params)):
        engine.add_request(f"{id_prefix}{i}", {"prompt_token_ids": prompt}, params)
    first: dict[str, float] = {}
    done: dict[str, tuple[float, int]] = {}
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            first.setdefault(out.request_id, now)
            if out.finished:
                done[out.request_id] = (now, len(out.outputs[0].token_ids))
        if on_step is not None:
            on_step()
    wall = time.perf_counter() - t0
    ttft = [first[r] - t0 for r in first]
    tpot = [(done[r][0] - first[r]) / (done[r][1] - 1) for r in done if done[r][1] > 1]
    return wall, ttft, tpot


KV_WHAT_IF_BLOCK_SIZES = (1, 8, 16, 32)


class KVMonitor:
    """How full fast's KV cache is, sampled after every engine step (when every allocated slot
    has been written: blocks are allocated for a step's tokens at schedule time and the step
    computes them all).

    kv_utilization = Σ_steps tokens held / Σ_steps slots of allocated blocks, where tokens held
    = Σ over running requests of num_computed_tokens (a block shared by k requests counts k
    times, so prefix sharing can exceed 100 %) and allocated blocks = pool - free blocks (free
    includes cached blocks no request holds). It is a step-weighted ratio of totals, not a mean
    of per-step ratios. Without sharing the gap is exactly the last, partly filled block of each
    request: Σ ((-tokens) mod block_size).

    Also: the same ratio at the step with the most allocated blocks (peak), the plain mean of the
    per-step ratios (kv_utilization_step_mean: small late steps weigh as much), how full the pool is
    (mean and peak), tokens and slots wasted per running request, the expected waste for
    uniformly distributed lengths, (block_size - 1) / 2, and, at the same per-request token
    counts, the utilization other block sizes would give (kv_util_if_block_size; no sharing).
    """

    def __init__(self, engine):
        self.engine = engine
        self.block_size = engine.config.block_size
        self.pool_slots = engine.num_blocks * self.block_size
        self.steps = 0
        self.used = self.alloc = self.requests = 0
        self.peak_alloc, self.util_at_peak = -1, None
        self.ratio_sum, self.ratio_steps = 0.0, 0
        self.what_if = dict.fromkeys(KV_WHAT_IF_BLOCK_SIZES, 0)

    def __call__(self) -> None:
        tokens = [r.num_computed_tokens for r in self.engine.scheduler.running]
        used = sum(tokens)
        alloc = (self.engine.num_blocks - self.engine.kv.num_free_blocks) * self.block_size
        self.steps += 1
        self.used += used
        self.alloc += alloc
        self.requests += len(tokens)
        if alloc:
            self.ratio_sum, self.ratio_steps = self.ratio_sum + used / alloc, self.ratio_steps + 1
        if alloc > self.peak_alloc:
            self.peak_alloc, self.util_at_peak = alloc, used / alloc if alloc else None
        for b in self.what_if:
            self.what_if[b] += sum(-(-t // b) * b for t in tokens)

    @property
    def utilization(self) -> float | None:
        return self.used / self.alloc if self.alloc else None

    def stats(self) -> dict:
        if not self.steps:
            return {}
        per_req = lambda x: x / self.requests if self.requests else None  # noqa: E731
        return {
            "kv_block_size": self.block_size,
            "kv_pool_slots": self.pool_slots,
            "kv_utilization_at_peak": self.util_at_peak,
            "kv_utilization_step_mean": self.ratio_sum / self.ratio_steps if self.ratio_steps else None,
            "kv_pool_usage_mean": self.alloc / (self.steps * self.pool_slots),
            "kv_pool_usage_peak": self.peak_alloc / self.pool_slots,
            "kv_tokens_per_request": per_req(self.used),
            "kv_waste_per_request": per_req(self.alloc - self.used),
            "kv_waste_expected_uniform": (self.block_size - 1) / 2,
            "kv_util_if_block_size": {str(b): (self.used / s if s else None) for b, s in self.what_if.items()},
        }


def record_steps(engine) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Wrap the engine's executor to record, per executed step, (tokens through the model, logits
    rows) — what the GEMM floor replays — and the running and waiting requests during the step.
    Returns the three lists, filled as the engine runs."""
    steps: list[tuple[int, int]] = []
    running: list[int] = []
    waiting: list[int] = []
    executor = engine.executor
    original_execute = executor.execute_model

    def execute_model(scheduler_output):
        running.append(len(engine.scheduler.running))
        waiting.append(len(engine.scheduler.waiting))
        runner_output = original_execute(scheduler_output)
        steps.append((scheduler_output.total_num_scheduled_tokens, len(runner_output.req_ids)))
        return runner_output

    executor.execute_model = execute_model
    return steps, running, waiting


def _saturated_mean(running: list[int], waiting: list[int]) -> float | None:
    """Mean running requests over the steps in which some request still waited (memory, not
    demand, was the limit)."""
    sat = [r for r, w in zip(running, waiting) if w > 0]
    return sum(sat) / len(sat) if sat else None


def run_fast(model_dir: str, workload: Workload, **options) -> RunResult:
    """fast on `workload`; concurrency = running requests during each step (at schedule time)."""
    from fast import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model=model_dir, max_model_len=workload.max_model_len, **options))
    steps, running, waiting = record_steps(engine)
    monitor = KVMonitor(engine)
    wall, ttft, tpot = _drive(engine, workload, monitor)
    m = engine.get_metrics()
    backend = engine.executor.driver_call("attention_backend_name")
    return RunResult(f"fast[{backend}]", workload.name, wall, workload.num_output_tokens,
                     workload.num_prompt_tokens, ttft, tpot,
                     kv_utilization=monitor.utilization,
                     max_concurrent=max(running, default=0), preemptions=m.num_preemptions,
                     prefix_hit_rate=m.prefix_cache_hit_rate, step_tokens=steps,
                     mean_concurrent=sum(running) / len(running) if running else None,
                     kv_stats={**monitor.stats(), "concurrency_saturated_mean": _saturated_mean(running, waiting)})


# ----------------------------------------------------------------------------- contiguous baselines

def contiguous_concurrency(requests: list[tuple[int, int]], budget_slots: int,
                           reserve: Callable[[int, int], int]) -> dict:
    """Concurrency of an Orca-style engine with a contiguous KV cache of `budget_slots` token
    slots: iteration-level batching, FCFS admission without overtaking, a request admitted when
    `reserve(prompt_len, max_tokens)` slots are free, holding them until it finishes; each step
    every running request makes one token (the admission step computes the prompt and makes
    the first). requests: (prompt_len, max_tokens) in arrival order, all arriving at once.
    Returns {"max", "mean" (running requests per step), "saturated_mean" (the mean over the
    steps in which a request still waited), "steps"}."""
    queue = deque(requests)
    running: list[list[int]] = []  # [tokens still to make, reserved slots]
    free, steps, total, peak = budget_slots, 0, 0, 0
    sat_steps = sat_total = 0
    while queue or running:
        while queue and reserve(*queue[0]) <= free:
            p, m = queue.popleft()
            need = reserve(p, m)
            free -= need
            running.append([m, need])
        if not running:
            raise ValueError(f"a request reserves {reserve(*queue[0])} slots > the budget {budget_slots}")
        steps += 1
        total += len(running)
        peak = max(peak, len(running))
        if queue:
            sat_steps += 1
            sat_total += len(running)
        for r in running:
            r[0] -= 1
        free += sum(r[1] for r in running if r[0] <= 0)
        running = [r for r in running if r[0] > 0]
    return {"max": peak, "mean": total / steps if steps else 0.0,
            "saturated_mean": sat_total / sat_steps if sat_steps else None, "steps": steps}


def orca_baselines(workload: Workload, budget_slots: int) -> dict:
    """The vLLM paper's contiguous baselines at `budget_slots` KV token slots (equal memory):
    Orca-Max reserves max_model_len per request, Orca-Pow2 the next power of two >= prompt +
    max_tokens (at most max_model_len), Orca-Oracle exactly prompt + max_tokens."""
    reqs = [(len(p), m) for p, m in zip(workload.prompts, workload.max_tokens)]
    cap = workload.max_model_len
    rules = {
        "orca_max": lambda p, m: cap,
        "orca_pow2": lambda p, m: min(cap, 1 << (p + m - 1).bit_length()),
        "orca_oracle": lambda p, m: p + m,
    }
    out = {}
    for name, rule in rules.items():
        c = contiguous_concurrency(reqs, budget_slots, rule)
        out[f"{name}_concurrency_max"], out[f"{name}_concurrency_mean"] = c["max"], c["mean"]
        out[f"{name}_concurrency_saturated_mean"] = c["saturated_mean"]
    return out


def run_ref(model_dir: str, workload: Workload, max_batch: int = 64) -> RunResult:
    from ref import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model=model_dir, max_model_len=workload.max_model_len, max_batch=max_batch))
    wall, ttft, tpot = _drive(engine, workload)
    m = engine.get_metrics()
    return RunResult("ref", workload.name, wall, workload.num_output_tokens, workload.num_prompt_tokens, ttft, tpot,
                     kv_utilization=m.kv_utilization, max_concurrent=m.max_concurrent_seqs)


def _hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.inference_mode()
def run_hf_generate(model_dir: str, workload: Workload, batch_size: int = 64) -> RunResult:
    """Static batches, left-padded, each run to its longest max_tokens (then trimmed)."""
    model = _hf_model(model_dir)
    t0 = time.perf_counter()
    for start in range(0, len(workload.prompts), batch_size):
        prompts = workload.prompts[start:start + batch_size]
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        new = max(workload.max_tokens[start:start + batch_size])
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
    return RunResult("hf-generate", workload.name, time.perf_counter() - t0, workload.num_output_tokens,
                     workload.num_prompt_tokens)


@torch.inference_mode()
def run_hf_generate_batch(model_dir: str, workload: Workload) -> RunResult:
    """transformers' continuous batching; one generation config, so max_new_tokens = the max."""
    from transformers import GenerationConfig

    from conformance.adapters import hf_paged_cache_config

    model = _hf_model(model_dir)
    new = max(workload.max_tokens)
    # Left alone, transformers sizes its paged cache from the machine's free memory (~15 GB RSS
    # on a 24 GB machine); give it what the workload needs, as fast's memory workload does.
    cb_config = hf_paged_cache_config(workload.prompts, new)
    t0 = time.perf_counter()
    model.generate_batch(workload.prompts, generation_config=GenerationConfig(
        max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0),
        continuous_batching_config=cb_config, warmup=False)
    return RunResult("hf-generate_batch", workload.name, time.perf_counter() - t0, workload.num_output_tokens,
                     workload.num_prompt_tokens)


# ----------------------------------------------------------------------------- roofline
#
# The GEMM floor is a physical reference, so it uses the fastest fp32 GEMM this machine's torch
# offers for each shape, independently of fast's own linear layers: the candidates below, each
# probed on a small case (missing op, unsupported dtype or wrong result: skipped), timed on the
# checkpoint's own weights, min over repetitions, and per shape the fastest one counts.


@dataclass(frozen=True)
class GemmImpl:
    """One way to compute x @ W^T: `prepare(W, m)` once per weight (and row count m, for the
    implementations that pack for it; not timed), then `run(x, prepared)` (timed)."""

    name: str
    prepare: Callable[[torch.Tensor, int], object]
    run: Callable[[torch.Tensor, object], torch.Tensor]
    per_m: bool = False  # True: prepare depends on m (re-prepared for every row count)


def _onednn_prepare(w: torch.Tensor, m: int):
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous())


def _onednn_run(x: torch.Tensor, p) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")


def _mkl_prepare(w: torch.Tensor, m: int):
    return torch.ops.mkl._mkl_reorder_linear_weight(w.contiguous(), m), w


def _mkl_run(x: torch.Tensor, p) -> torch.Tensor:
    packed, w = p
    return torch.ops.mkl._mkl_linear(x, packed, w, None, x.shape[0])


GEMM_CANDIDATES = (
    # MKL sgemm on the checkpoint layout [out, in] (what F.linear does on CPU).
    GemmImpl("F.linear", lambda w, m: w, lambda x, w: torch.nn.functional.linear(x, w)),
    # oneDNN with the weight reordered once into its blocked layout.
    GemmImpl("onednn-prepacked", _onednn_prepare, _onednn_run),
    # MKL's packed sgemm (cblas_sgemm_pack) for a given row count: inductor's fp32 weight prepack.
    GemmImpl("mkl-packed", _mkl_prepare, _mkl_run, per_m=True),
)


def gemm_impls(dtype: torch.dtype = torch.float32) -> list[GemmImpl]:
    """The candidates that exist in this torch and compute the right result for `dtype` on CPU."""
    ok = []
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=gen).to(dtype)
    x = torch.randn(5, 40, generator=gen).to(dtype)
    want = torch.nn.functional.linear(x.double(), w.double())
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for impl in GEMM_CANDIDATES:
        if impl.name != "F.linear" and not torch.backends.mkldnn.is_available():
            continue
        try:
            with torch.inference_mode():
                got = impl.run(x, impl.prepare(w, x.shape[0]))
            if torch.allclose(got.double(), want, rtol=tol, atol=tol):
                ok.append(impl)
        except (RuntimeError, AttributeError, NotImplementedError):  # op missing or dtype unsupported
            continue
    return ok


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclass(frozen=True)
class PeakResult:
    flops: float  # best fp32 FLOP/s of an n x n x n GEMM over the candidates
    impl: str  # the candidate that reached it
    by_impl: dict[str, float]


@torch.inference_mode()
def matmul_peak(n: int = 2048, reps: int = 5) -> PeakResult:
    """This machine's fp32 GEMM throughput (FLOP/s): best over `reps` and over the candidates."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    prepared = {impl.name: (impl, impl.prepare(b, n)) for impl in gemm_impls()}
    best = dict.fromkeys(prepared, float("inf"))
    for impl, p in prepared.values():
        impl.run(a, p)  # warm-up
    for _ in range(reps):  # interleaved: every candidate sees the same load
        for name, (impl, p) in prepared.items():
            best[name] = min(best[name], _timed(lambda: impl.run(a, p)))
    by_impl = {name: 2 * n**3 / t for name, t in best.items()}
    winner = max(by_impl, key=by_impl.get)
    return PeakResult(by_impl[winner], winner, by_impl)


def matmul_peak_flops(n: int = 2048, reps: int = 5) -> float:
    """This machine's fp32 GEMM throughput (FLOP/s): best of `reps` and of the GEMM candidates."""
    return matmul_peak(n, reps).flops


LINEAR_KINDS = ("qkv", "o_proj", "gate_up", "down_proj")


def checkpoint_linears(model_dir: str) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor]:
    """The model's linear weights read straight from its safetensors (not through fast), with
    q/k/v and gate/up concatenated as one GEMM each (fewer, larger GEMMs: the faster layout, so
    the honest floor): ({kind: [weight [out, in] per layer]}, lm_head [vocab, hidden])."""
    from safetensors.torch import load_file

    from ref.config import ModelConfig

    c = ModelConfig.from_pretrained(model_dir)
    t: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        t.update(load_file(str(f)))
    kinds: dict[str, list[torch.Tensor]] = {k: [] for k in LINEAR_KINDS}
    for i in range(c.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        kinds["qkv"].append(torch.cat([t[a + p + "_proj.weight"] for p in "qkv"]))
        kinds["o_proj"].append(t[a + "o_proj.weight"].contiguous())
        kinds["gate_up"].append(torch.cat([t[m + "gate_proj.weight"], t[m + "up_proj.weight"]]))
        kinds["down_proj"].append(t[m + "down_proj.weight"].contiguous())
    lm_head = t.get("lm_head.weight", t["model.embed_tokens.weight"]).contiguous()
    return kinds, lm_head


@dataclass
class GemmFloor:
    """The floor of a recorded run: seconds of its GEMMs alone at the fastest candidate per shape.

    `set_by`: seconds of the floor each candidate contributed (the one that won each shape);
    `by_impl`: the floor had every shape used that candidate only (F.linear's is the old floor).
    """

    seconds: float
    set_by: dict[str, float]
    by_impl: dict[str, float]
    gemm_flops: float  # FLOPs of those GEMMs (2 * m * n * k summed)

    @property
    def impl(self) -> str:
        """Which candidate set the floor: 'name' or 'name 93% + other 7%' by share of its time."""
        shares = sorted(((s / self.seconds, n) for n, s in self.set_by.items() if s > 0), reverse=True)
        shown = [(f, n) for f, n in shares if f >= 0.005] or shares[:1]
        if len(shown) == 1:
            return shown[0][1]
        return " + ".join(f"{n} {100 * f:.0f}%" for f, n in shown)

    def info(self, prefix: str = "gemm_floor") -> dict:
        return {f"{prefix}_s": self.seconds, f"{prefix}_impl": self.impl,
                f"{prefix}_set_by_s": dict(self.set_by), f"{prefix}_by_impl_s": dict(self.by_impl),
                f"{prefix}_gemm_flops": self.gemm_flops}


class GemmTimer:
    """Times the model's linear shapes at given row counts, each shape min over `reps` and over
    the candidates; results cached per row count (a run repeats few distinct counts)."""

    def __init__(self, model_dir: str, reps: int = 3, impls: list[GemmImpl] | None = None):
        self.kinds, self.lm_head = checkpoint_linears(model_dir)
        self.hidden = self.lm_head.shape[1]
        self.reps = reps
        self.impls = impls if impls is not None else gemm_impls(self.lm_head.dtype)
        self._static = {impl.name: {k: [impl.prepare(w, 0) for w in ws] for k, ws in self.groups().items()}
                        for impl in self.impls if not impl.per_m}
        self._cache: dict[tuple[str, int], dict[str, float]] = {}  # (group, m) -> {impl: s}

    def groups(self) -> dict[str, list[torch.Tensor]]:
        return {**self.kinds, "lm_head": [self.lm_head]}

    @torch.inference_mode()
    def times(self, group: str, m: int, refresh: bool = False) -> dict[str, float]:
        """{impl: best seconds} of every weight of `group` at m rows (one layer pass); `refresh`
        times it again and keeps the best of old and new."""
        key = (group, m)
        if refresh or key not in self._cache:
            weights = self.groups()[group]
            x = torch.randn(m, weights[0].shape[1], dtype=weights[0].dtype)
            runs = {}
            for impl in self.impls:
                prepared = self._static[impl.name][group] if not impl.per_m else [impl.prepare(w, m) for w in weights]
                runs[impl.name] = (lambda impl=impl, prepared=prepared: [impl.run(x, p) for p in prepared])
            best = dict.fromkeys(runs, float("inf"))
            for fn in runs.values():
                fn()  # warm-up
            for _ in range(self.reps):  # interleaved, so every candidate sees the same load
                for name, fn in runs.items():
                    best[name] = min(best[name], _timed(fn))
            old = self._cache.get(key, best)
            self._cache[key] = {name: min(best[name], old[name]) for name in best}
        return self._cache[key]

    def _keys(self, step_tokens: list[tuple[int, int]]) -> list[tuple[str, int]]:
        keys = {(k, n) for n, _ in step_tokens for k in self.kinds} | {("lm_head", r) for _, r in step_tokens}
        return sorted(key for key in keys if key[1] > 0)

    def remeasure(self, step_tokens: list[tuple[int, int]]) -> None:
        """Time every shape of these steps once more (keeping the best): called between the
        rounds of the engine it is compared with, floor and engine see the same load."""
        for group, m in self._keys(step_tokens):
            self.times(group, m, refresh=True)

    def floor(self, step_tokens: list[tuple[int, int]]) -> GemmFloor:
        """The floor of steps given as (tokens through the layers, logits rows)."""
        names = [impl.name for impl in self.impls]
        set_by = dict.fromkeys(names, 0.0)
        by_impl = dict.fromkeys(names, 0.0)
        flops = 0.0
        for n, rows in step_tokens:
            for group, m in [*((k, n) for k in self.kinds), ("lm_head", rows)]:
                if m <= 0:
                    continue
                t = self.times(group, m)
                winner = min(t, key=t.get)
                set_by[winner] += t[winner]
                for name in names:
                    by_impl[name] += t[name]
                flops += sum(2 * m * w.shape[0] * w.shape[1] for w in self.groups()[group])
        return GemmFloor(sum(set_by.values()), set_by, by_impl, flops)


def gemm_floor(model_dir: str, step_tokens: list[tuple[int, int]], reps: int = 3) -> GemmFloor:
    """Time of the model's linear layers alone over the same per-step token counts and logits
    rows as a recorded run, each shape at the fastest GEMM candidate: the physical floor of that
    run on this CPU (attention, norms and everything else cost extra)."""
    return GemmTimer(model_dir, reps).floor(step_tokens)


def gemm_floor_s(model_dir: str, step_tokens: list[tuple[int, int]], reps: int = 3) -> float:
    return gemm_floor(model_dir, step_tokens, reps).seconds


def model_flops(model_dir: str, workload: Workload) -> float:
    """FLOPs of the workload's forward passes: 2 * linear params per token (+ lm_head per output
    token) + attention (4 * context * q_dim per token per layer), prefill and decode."""
    from ref.config import ModelConfig

    c = ModelConfig.from_pretrained(model_dir)
    q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (q_dim + 2 * kv_dim) + q_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    linear = 2 * per_layer * c.num_hidden_layers
    total = 0.0
    for prompt, out in zip(workload.prompts, workload.max_tokens):
        n = len(prompt) + out - 1  # tokens fed through the model
        total += linear * n + 2 * c.hidden_size * c.vocab_size * out
        total += c.num_hidden_layers * 4 * q_dim * (n * (n + 1) / 2)  # causal attention
    return total
