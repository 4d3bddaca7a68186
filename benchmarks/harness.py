"""Run one workload through one engine and measure it; plus the roofline references.

Every engine is timed end to end (prefill included) on the same prompts. Engines with a
`step()` API (fast, ref) are driven step by step so that TTFT/TPOT per request are observed;
HF `generate` (static padded batches) and `generate_batch` (continuous batching) run whole.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

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
    kv_utilization: float | None = None  # fraction of allocated KV slots holding tokens
    max_concurrent: int | None = None
    preemptions: int | None = None
    prefix_hit_rate: float | None = None
    step_tokens: list[tuple[int, int]] = field(default_factory=list)  # (tokens, logits rows) per step

    def extra_info(self) -> dict:
        pct = lambda xs, q: (statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else (xs[0] if xs else None))  # noqa: E731
        return {
            "engine": self.engine, "workload": self.workload, "wall_s": self.wall_s,
            "output_tok_s": self.output_tokens / self.wall_s,
            "total_tok_s": (self.output_tokens + self.prompt_tokens) / self.wall_s,
            "ttft_p50_s": pct(self.ttft_s, 50), "ttft_p99_s": pct(self.ttft_s, 99),
            "tpot_p50_s": pct(self.tpot_s, 50), "tpot_p99_s": pct(self.tpot_s, 99),
            "kv_utilization": self.kv_utilization, "max_concurrent": self.max_concurrent,
            "preemptions": self.preemptions, "prefix_hit_rate": self.prefix_hit_rate,
        }


def _drive(engine, workload: Workload, on_step=None):
    """Add every request, step until done; returns (wall, ttft list, tpot list)."""
    t0 = time.perf_counter()
    for i, (prompt, params) in enumerate(zip(workload.prompts, workload.params)):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
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


def run_fast(model_dir: str, workload: Workload, **options) -> RunResult:
    from fast import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model=model_dir, max_model_len=workload.max_model_len, **options))
    steps: list[tuple[int, int]] = []
    slots = {"used": 0, "alloc": 0, "max_running": 0}
    sched, executor = engine.scheduler, engine.executor
    original_execute = executor.execute_model

    def execute_model(scheduler_output):  # record the token counts the GEMM floor must replay
        runner_output = original_execute(scheduler_output)
        steps.append((scheduler_output.total_num_scheduled_tokens, len(runner_output.req_ids)))
        return runner_output

    executor.execute_model = execute_model

    def on_step():
        running = sched.running
        slots["max_running"] = max(slots["max_running"], len(running))
        slots["used"] += sum(r.num_computed_tokens for r in running)
        slots["alloc"] += (engine.num_blocks - engine.kv.num_free_blocks) * engine.config.block_size

    wall, ttft, tpot = _drive(engine, workload, on_step)
    m = engine.get_metrics()
    backend = executor.driver_call("attention_backend_name")
    return RunResult(f"fast[{backend}]", workload.name, wall, workload.num_output_tokens,
                     workload.num_prompt_tokens, ttft, tpot,
                     kv_utilization=slots["used"] / slots["alloc"] if slots["alloc"] else None,
                     max_concurrent=slots["max_running"], preemptions=m.num_preemptions,
                     prefix_hit_rate=m.prefix_cache_hit_rate, step_tokens=steps)


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

def matmul_peak_flops(n: int = 2048, reps: int = 5) -> float:
    """This machine's fp32 GEMM throughput (FLOP/s), best of `reps`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.inference_mode()
def gemm_floor_s(model_dir: str, step_tokens: list[tuple[int, int]], reps: int = 3) -> float:
    """Time of the model's linear layers alone (fast's fused weights) over the same per-step
    token counts and logits rows as a recorded run: the physical floor of that run on this CPU."""
    from fast.worker.model import PagedDecoder

    model = PagedDecoder.from_pretrained(model_dir)
    hidden = model.config.hidden_size
    linears = [lin for layer in model.layers for lin in (layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj)]
    cache: dict[tuple[int, int], float] = {}

    def step_time(n: int, rows: int) -> float:
        x = torch.randn(n, hidden)
        def run():
            for lin in linears:
                torch.nn.functional.linear(x if lin.in_features == hidden else torch.empty(n, lin.in_features), lin.weight)
            torch.nn.functional.linear(x[:rows], model.lm_head)
        run()
        return min(_timed(run) for _ in range(reps))

    total = 0.0
    for key in step_tokens:
        if key not in cache:
            cache[key] = step_time(*key)
        total += cache[key]
    return total


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
