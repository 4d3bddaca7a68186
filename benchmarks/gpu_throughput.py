"""On a CUDA machine: fast's end-to-end throughput beside HF `generate` and the GEMM floor (run by gpu.sh).

    python benchmarks/gpu_throughput.py --out DIR [--quick] [--device cuda]

The model is a random-initialized Llama of ~0.85 B parameters (hidden 2048, 16 layers, 32 query /
8 KV heads of 64, vocab 32000) in bf16, written with `save_pretrained` into a temp dir: nothing is
downloaded, the outputs are gibberish, the arithmetic is real. The workload: `num_requests`
prompts of `prompt_len` random token ids, each generating exactly `max_tokens` (greedy,
ignore_eos), all queued at once (offline).

Rows (one run each, after a warm-up run of the same engine that compiles the kernels):
- `fast[<backend>]`: fast with the auto-picked attention backend (Triton on CUDA), and with the
  torch backend;
- `hf-generate`: transformers' `generate` in static batches of 64 (no padding: equal prompts), SDPA;
- `gemm-floor`: the seconds fast's linear layers alone take over fast's own schedule — for every
  step, the model's GEMMs (q/k/v and gate/up fused, the faster layout) at that step's token count
  plus the LM head at its logits rows, `torch.nn.functional.linear` in bf16 timed with CUDA events
  on the checkpoint's weights (read from safetensors, not through fast).

Reported: output tok/s, wall seconds, fast / HF speedup, fast's time over the floor. Writes
gpu_throughput.json and gpu_throughput.md into --out. `--device cpu --quick` shrinks the model
and the workload so the script itself can be checked on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.harness import LINEAR_KINDS, checkpoint_linears, record_steps  # noqa: E402

BIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
           num_attention_heads=32, num_key_value_heads=8, head_dim=64)
SMALL = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def write_model(out: Path, shape: dict, dtype: torch.dtype, device: str) -> Path:
    """A random Llama of `shape`, initialized on `device` (fast), saved in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **shape, max_position_embeddings=4096, rms_norm_eps=1e-6,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.save_pretrained(str(out))
    return out


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_fast(model_dir: Path, prompts, max_tokens: int, device: str, backend: str) -> dict:
    """One warm-up generate (compiles), then the timed run on a fresh engine's same schedule."""
    from fast import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm = LLM(str(model_dir), device=device, attention_backend=backend, dtype="bfloat16",
              max_model_len=len(prompts[0]) + max_tokens, max_num_seqs=256, skip_tokenizer_init=True,
              kv_cache_memory=_kv_bytes(model_dir, prompts, max_tokens))
    try:
        # Warm-up (compiles the kernels) on other prompts: the timed run must not hit their blocks.
        warm = make_prompts(8, len(prompts[0]), max(p for ps in prompts for p in ps) + 1, seed=1)
        llm.generate([{"prompt_token_ids": p} for p in warm], params, use_tqdm=False)
        engine = llm.llm_engine
        steps, _, _ = record_steps(engine)
        _sync(device)
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        _sync(device)
        wall = time.perf_counter() - t0
        name = engine.executor.driver_call("attention_backend_name")
        m = engine.get_metrics()
    finally:
        llm.shutdown()
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"engine": f"fast[{name}]", "wall_s": wall, "output_tokens": tokens, "steps": len(steps),
            "preemptions": m.num_preemptions, "step_tokens": steps}


def _kv_bytes(model_dir: Path, prompts, max_tokens: int) -> int:
    """KV for every request at once (no preemption), plus one block each of slack."""
    c = json.loads((model_dir / "config.json").read_text())
    per_token = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * 2  # bf16
    return per_token * len(prompts) * (len(prompts[0]) + max_tokens + 16)


@torch.inference_mode()
def run_hf(model_dir: Path, prompts, max_tokens: int, device: str, batch_size: int = 64) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").to(device).eval()

    def generate(batch):
        ids = torch.tensor(batch, device=device)
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                              min_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

    generate(prompts[:8])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    tokens = 0
    for start in range(0, len(prompts), batch_size):
        out = generate(prompts[start:start + batch_size])
        tokens += out[:, len(prompts[0]):].numel()
    _sync(device)
    wall = time.perf_counter() - t0
    return {"engine": f"hf-generate[batch {batch_size}]", "wall_s": wall, "output_tokens": tokens}


@torch.inference_mode()
def gemm_floor(model_dir: Path, step_tokens: list[tuple[int, int]], device: str, reps: int = 5) -> dict:
    """Seconds of the model's GEMMs alone over a recorded schedule (module docstring)."""
    kinds, lm_head = checkpoint_linears(str(model_dir))
    groups = {k: [w.to(device, torch.bfloat16) for w in kinds[k]] for k in LINEAR_KINDS}
    groups["lm_head"] = [lm_head.to(device, torch.bfloat16)]
    cache: dict[tuple[str, int], float] = {}

    def seconds(group: str, m: int) -> float:
        if (group, m) not in cache:
            ws = groups[group]
            x = torch.randn(m, ws[0].shape[1], device=device, dtype=torch.bfloat16)
            for w in ws:
                torch.nn.functional.linear(x, w)  # warm-up
            best = float("inf")
            for _ in range(reps):
                best = min(best, _timed(lambda: [torch.nn.functional.linear(x, w) for w in ws], device))
            cache[(group, m)] = best
        return cache[(group, m)]

    total, flops = 0.0, 0.0
    for n, rows in step_tokens:
        for group, m in [*((k, n) for k in LINEAR_KINDS), ("lm_head", rows)]:
            if m > 0:
                total += seconds(group, m)
                flops += sum(2 * m * w.shape[0] * w.shape[1] for w in groups[group])
    return {"engine": "gemm-floor", "wall_s": total, "gemm_flops": flops, "distinct_shapes": len(cache)}


def _timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def report(results: dict) -> str:
    rows = results["rows"]
    fast = [r for r in rows if r["engine"].startswith("fast[")]
    hf = next((r for r in rows if r["engine"].startswith("hf-")), None)
    floor = next((r for r in rows if r["engine"] == "gemm-floor"), None)
    w = results["workload"]
    lines = [f"# fast on {results['device']}: end-to-end throughput", "",
             f"Model: random Llama {results['params_b']:.2f} B parameters, bf16 ({results['shape']}). "
             f"Workload: {w['num_requests']} requests x {w['prompt_len']} prompt tokens -> {w['max_tokens']} "
             f"output tokens each (greedy, ignore_eos), offline. torch {results['torch']}, "
             f"`python benchmarks/gpu_throughput.py`.", "",
             "| engine | wall s | output tok/s | vs HF generate | over GEMM floor |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | failed | | | |")
            continue
        tok_s = r["output_tokens"] / r["wall_s"] if r.get("output_tokens") else None
        vs_hf = (hf["wall_s"] / r["wall_s"]) if hf and "error" not in hf and tok_s else None
        over = (r["wall_s"] / floor["wall_s"]) if floor and "error" not in floor and r in fast else None
        lines.append(f"| {r['engine']} | {r['wall_s']:.2f} | {f'{tok_s:,.0f}' if tok_s else '-'} | "
                     f"{f'{vs_hf:.2f}x' if vs_hf else '-'} | {f'{over:.2f}x' if over else '-'} |")
    if floor and "error" not in floor:
        lines += ["", f"GEMM floor: fast's schedule ({fast[0]['steps'] if fast else '?'} steps) replayed as bf16 "
                  f"F.linear only, {floor['distinct_shapes']} distinct shapes, "
                  f"{floor['gemm_flops'] / floor['wall_s'] / 1e12:.0f} TFLOP/s over the floor's time."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/gpu_results"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="a small model and workload (checks the script)")
    args = ap.parse_args(argv)
    shape = SMALL if args.quick else BIG
    n, prompt_len, max_tokens = (16, 32, 8) if args.quick else (256, 512, 128)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               "torch": torch.__version__, "shape": shape,
               "workload": {"num_requests": n, "prompt_len": prompt_len, "max_tokens": max_tokens}, "rows": []}
    ok = True
    with tempfile.TemporaryDirectory(prefix="pagedlm-gpu-model-") as tmp:
        t0 = time.perf_counter()
        model_dir = write_model(Path(tmp), shape, torch.bfloat16, args.device)
        results["model_write_s"] = round(time.perf_counter() - t0, 1)
        kinds, lm_head = checkpoint_linears(str(model_dir))
        results["params_b"] = (sum(w.numel() for ws in kinds.values() for w in ws) + 2 * lm_head.numel()) / 1e9
        prompts = make_prompts(n, prompt_len, shape["vocab_size"])
        steps = None
        jobs = [("fast", lambda: run_fast(model_dir, prompts, max_tokens, args.device, "auto")),
                ("fast-torch", lambda: run_fast(model_dir, prompts, max_tokens, args.device, "torch")),
                ("hf", lambda: run_hf(model_dir, prompts, max_tokens, args.device)),
                ("floor", lambda: gemm_floor(model_dir, steps, args.device))]
        for name, job in jobs:
            if name == "floor" and steps is None:
                continue
            try:
                row = job()
            except Exception as e:  # noqa: BLE001 - every failure is reported in the JSON
                import traceback
                ok = False
                row = {"engine": name, "error": traceback.format_exc()[-3000:]}
                print(f"{name} failed: {e!r}", flush=True)
            if name == "fast" and "step_tokens" in row:
                steps = row["step_tokens"]
            row.pop("step_tokens", None)
            results["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    (out / "gpu_throughput.json").write_text(json.dumps(results, indent=2))
    md = report(results)
    (out / "gpu_throughput.md").write_text(md)
    print(md)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
