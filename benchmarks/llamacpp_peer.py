"""llama.cpp as a peer engine, driven by token ids through llama-cpp-python's low-level C API.

    python -m benchmarks.llamacpp_peer verify   # llama.cpp greedy == HF generate greedy?
    python -m benchmarks.llamacpp_peer bench    # single-request TPOT / prefill, offline 64

The checkpoint is exported once with `benchmarks.gguf_export` (f32 or f16 weights). The C API is
called directly (llama_decode on a llama_batch, argmax over the logits row) instead of the
`Llama` class, so what is timed is llama.cpp and one ctypes call per step, not the wrapper's
per-token Python bookkeeping. Three ways to run a workload:

- `greedy(prompt, n)`: one request alone on sequence 0 (its KV cache cleared first): the prompt
  in one llama_decode (chunks of n_batch), then one llama_decode per new token. Returns the
  tokens, the prompt time and each decode step's time.
- `run_sequential(workload)`: the requests one after another (llama.cpp's single-user path,
  a contiguous KV cache per request).
- `run_batched(workload)`: up to `n_parallel` requests at once in one llama_batch per step (a token
  per running sequence plus prompt chunks of admitted requests, distinct seq_ids, a token budget of
  n_batch per step), a finished sequence's cells freed with llama_memory_seq_rm and its slot
  given to the next request: continuous batching as llama.cpp's server does it, each sequence in
  its own KV stream of n_ctx / n_parallel cells (kv_unified=False; one unified cache was 2x slower
  here, every token attending over every sequence's cells under a mask).
  With separate streams llama.cpp puts only consecutive, increasing seq ids (in batch order) in one
  micro-batch (llama_batch_allocr::split_equal), so rows out of seq order, or the holes finished
  sequences leave, split a step into several micro-batches, each reading all the weights again (a
  48-sequence step took 2x the time of a 64-sequence one). So the rows go in seq-id order, and
  `compact=True` (the default) closes the holes once no request waits: the highest running
  sequence is moved into the free slot (llama_memory_seq_cp across streams copies its KV, then
  llama_memory_seq_rm) — something llama.cpp's server does not do.

Everything is greedy (argmax, the first index on ties, as torch.argmax), ignore-eos.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from benchmarks.harness import RunResult
from benchmarks.workloads import Workload

# name -> (weights, KV cache type, flash attention) of the llama.cpp configurations reported.
# Flash attention matters for precision: llama.cpp casts an f32 K/V cache to f16 before its
# flash-attention op (llama-graph.cpp, build_attn_mha), and "auto" turns flash attention on for
# the CPU; so an f32 KV cache is f32 only with flash attention off (max |logit - HF| ~1e-6 then,
# ~1e-3 with it on, the same as an f16 cache).
VARIANTS = {
    "f32-kvf32": ("f32", "f32", "off"),   # equal precision to fast/ref/HF: fp32 everything
    "f32": ("f32", "f16", "auto"),        # f32 weights, llama.cpp's defaults (f16 KV, flash attn auto)
    "f16": ("f16", "f16", "auto"),        # f16 weights, as llama.cpp users run an unquantized model
}


def available() -> tuple[bool, str]:
    """(True, "") if llama_cpp imports, else (False, why) — for pytest skips."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # ImportError, or the shared library failing to load
        return False, f"llama_cpp is not importable ({type(exc).__name__}: {exc}); `pip install -e '.[llamacpp]'`"
    return True, ""


# The clock of every timing here. On a shared machine, a single-threaded measurement can swap in
# time.process_time (CPU time of this process: what a quiet machine's wall clock would read).
CLOCK = time.perf_counter

_LOG_CALLBACK = None
_BACKEND_READY = False


def _init_backend(quiet: bool = True) -> None:
    global _LOG_CALLBACK, _BACKEND_READY
    import llama_cpp as lc

    if _BACKEND_READY:
        return
    if quiet:
        _LOG_CALLBACK = lc.llama_log_callback(lambda level, text, user: None)  # keep a reference
        lc.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    lc.llama_backend_init()
    _BACKEND_READY = True


def _ggml_type(name: str) -> int:
    import llama_cpp as lc

    return {"f32": lc.GGML_TYPE_F32, "f16": lc.GGML_TYPE_F16}[name]


@dataclass
class Generation:
    tokens: list[int]
    prompt_s: float  # prompt processing, through the first token's logits
    step_s: list[float] = field(default_factory=list)  # each later token's llama_decode + argmax

    @property
    def tpot_s(self) -> float:
        return statistics.median(self.step_s) if self.step_s else float("nan")


class LlamaCpp:
    """One llama.cpp model + context. `n_parallel` > 1 gives `run_batched` that many sequences."""

    def __init__(self, gguf_path: str, *, kv_type: str = "f32", n_threads: int = 2, n_ctx: int = 1024,
                 n_parallel: int = 1, n_batch: int = 512, n_ubatch: int = 512, flash_attn: str = "auto",
                 kv_unified: bool = False, quiet: bool = True):
        import llama_cpp as lc

        _init_backend(quiet)
        self._lc = lc
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = lc.llama_model_load_from_file(str(gguf_path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_ctx * n_parallel
        cparams.n_batch = n_batch
        cparams.n_ubatch = min(n_ubatch, n_batch)
        cparams.n_seq_max = n_parallel
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.type_k = cparams.type_v = _ggml_type(kv_type)
        cparams.flash_attn_type = {"auto": lc.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": lc.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                   "off": lc.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
        cparams.kv_unified = kv_unified
        cparams.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise RuntimeError("llama.cpp could not create a context")
        self.mem = lc.llama_get_memory(self.ctx)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.n_batch, self.n_parallel, self.n_ctx_seq = n_batch, n_parallel, n_ctx
        self.batch = lc.llama_batch_init(n_batch, 0, 1)
        self._logits_type = ctypes.POINTER(ctypes.c_float * self.n_vocab)

    def close(self) -> None:
        lc = self._lc
        if getattr(self, "ctx", None):
            lc.llama_batch_free(self.batch)
            lc.llama_free(self.ctx)
            lc.llama_model_free(self.model)
            self.ctx = self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- one llama_decode over (token, pos, seq, wants_logits) rows
    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        for i, (tok, pos, seq, out) in enumerate(rows):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = out
        b.n_tokens = len(rows)
        rc = self._lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for a batch of {len(rows)} tokens")

    def _argmax(self, i: int) -> int:
        ptr = self._lc.llama_get_logits_ith(self.ctx, i)
        return int(np.frombuffer(ctypes.cast(ptr, self._logits_type).contents, dtype=np.float32).argmax())

    def logits(self, i: int = -1) -> np.ndarray:
        ptr = self._lc.llama_get_logits_ith(self.ctx, i)
        return np.frombuffer(ctypes.cast(ptr, self._logits_type).contents, dtype=np.float32).copy()

    def reset(self) -> None:
        self._lc.llama_memory_clear(self.mem, True)

    def prefill(self, prompt: list[int], seq: int = 0, start: int = 0) -> None:
        """Feed `prompt` at positions start.. to `seq`; the last token's logits are kept."""
        for lo in range(0, len(prompt), self.n_batch):
            chunk = prompt[lo:lo + self.n_batch]
            last = lo + len(chunk) == len(prompt)
            self._decode([(t, start + lo + j, seq, last and j == len(chunk) - 1) for j, t in enumerate(chunk)])

    def greedy(self, prompt: list[int], max_new_tokens: int) -> Generation:
        """One request alone: greedy tokens, prompt time, per-decode-step times."""
        if len(prompt) + max_new_tokens > self.n_ctx_seq + 1:
            raise ValueError(f"prompt {len(prompt)} + {max_new_tokens} new tokens exceed n_ctx {self.n_ctx_seq}")
        self.reset()
        t0 = CLOCK()
        self.prefill(prompt)
        tok = self._argmax(-1)
        now = CLOCK()
        gen = Generation([tok], now - t0)
        pos = len(prompt)
        for _ in range(max_new_tokens - 1):
            t = now
            self._decode([(tok, pos, 0, True)])
            tok = self._argmax(0)
            now = CLOCK()
            gen.tokens.append(tok)
            gen.step_s.append(now - t)
            pos += 1
        return gen

    def run_sequential(self, workload: Workload, name: str = "llama.cpp") -> tuple[RunResult, list[list[int]]]:
        outputs, ttft, tpot = [], [], []
        t0 = CLOCK()
        for prompt, n in zip(workload.prompts, workload.max_tokens):
            start = CLOCK()
            gen = self.greedy(prompt, n)
            ttft.append(start - t0 + gen.prompt_s)  # every request arrives at t0, as in harness._drive
            if gen.step_s:
                tpot.append(sum(gen.step_s) / len(gen.step_s))
            outputs.append(gen.tokens)
        wall = CLOCK() - t0
        return RunResult(name, workload.name, wall, workload.num_output_tokens, workload.num_prompt_tokens,
                         ttft, tpot, max_concurrent=1), outputs

    def run_batched(self, workload: Workload, name: str = "llama.cpp-batched",
                    compact: bool = True) -> tuple[RunResult, list[list[int]]]:
        """Continuous batching over llama.cpp's multi-sequence batch API (see the module doc)."""
        lc = self._lc
        self.reset()
        n_req = len(workload.prompts)
        waiting = list(range(n_req))
        free_slots = list(range(self.n_parallel))[::-1]
        outputs: list[list[int]] = [[] for _ in range(n_req)]
        seq_of: dict[int, int] = {}   # request -> seq id
        fed: dict[int, int] = {}      # request -> prompt tokens already in the cache
        first: dict[int, float] = {}
        done: dict[int, float] = {}
        max_running = 0
        t0 = CLOCK()
        while len(done) < n_req:
            while waiting and free_slots:
                r = waiting.pop(0)
                seq_of[r], fed[r] = free_slots.pop(), 0
            max_running = max(max_running, len(seq_of))
            rows: list[tuple[int, int, int, bool]] = []
            owners: list[int] = []  # request of each row that wants logits
            running = sorted(seq_of.items(), key=lambda item: item[1])  # by seq id (see the module doc)
            for r, seq in running:  # decodes first: one token each
                if fed[r] == len(workload.prompts[r]) and outputs[r]:
                    rows.append((outputs[r][-1], len(workload.prompts[r]) + len(outputs[r]) - 1, seq, True))
                    owners.append(r)
            for r, seq in running:  # then prompt chunks within the token budget
                prompt = workload.prompts[r]
                room = self.n_batch - len(rows)
                if fed[r] < len(prompt) and room > 0:
                    chunk = prompt[fed[r]:fed[r] + room]
                    last = fed[r] + len(chunk) == len(prompt)
                    rows.extend((t, fed[r] + j, seq, last and j == len(chunk) - 1) for j, t in enumerate(chunk))
                    fed[r] += len(chunk)
                    if last:
                        owners.append(r)
            self._decode(rows)
            out_index = [i for i, row in enumerate(rows) if row[3]]
            now = CLOCK()
            for i, r in zip(out_index, owners):
                outputs[r].append(self._argmax(i))
                first.setdefault(r, now)
                if len(outputs[r]) == workload.max_tokens[r]:
                    done[r] = now
                    seq = seq_of.pop(r)
                    lc.llama_memory_seq_rm(self.mem, seq, -1, -1)
                    free_slots.append(seq)
            if compact and not waiting:  # keep the running seq ids 0..n-1 (see the module doc)
                n = len(seq_of)
                holes = sorted(s for s in free_slots if s < n)
                for r in [r for r, s in seq_of.items() if s >= n]:
                    src, dst = seq_of[r], holes.pop(0)
                    lc.llama_memory_seq_cp(self.mem, src, dst, -1, -1)
                    lc.llama_memory_seq_rm(self.mem, src, -1, -1)
                    seq_of[r] = dst
                    free_slots.remove(dst)
                    free_slots.append(src)
        wall = CLOCK() - t0
        tpot = [(done[r] - first[r]) / (len(outputs[r]) - 1) for r in done if len(outputs[r]) > 1]
        return RunResult(name, workload.name, wall, workload.num_output_tokens, workload.num_prompt_tokens,
                         [first[r] - t0 for r in first], tpot, max_concurrent=max_running), outputs


def open_variant(model_dir: str, variant: str, **kwargs) -> LlamaCpp:
    """A LlamaCpp for VARIANTS[variant] on `model_dir` (its GGUF exported once, cached)."""
    from benchmarks.gguf_export import cached_export

    weights, kv, flash_attn = VARIANTS[variant]
    kwargs.setdefault("flash_attn", flash_attn)
    return LlamaCpp(str(cached_export(model_dir, weights)), kv_type=kv, **kwargs)


# ----------------------------------------------------------------------------- verification

def hf_greedy(model_dir: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """HF transformers' greedy `generate`, one prompt at a time (no padding), fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
            outs.append(out[0, len(p):].tolist())
    return outs


def verify_prompts(vocab: int, n: int = 4, seed: int = 0, lengths=(5, 37, 120, 300)) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def verify(model_dir: str, variants=tuple(VARIANTS), n_prompts: int = 4, max_new_tokens: int = 64,
           n_threads: int = 2, flash_attn: str | None = None) -> dict[str, list[int | None]]:
    """For each variant, the first index where llama.cpp's greedy tokens differ from HF's, per
    prompt (None: identical)."""
    import json

    vocab = json.load(open(f"{model_dir}/config.json"))["vocab_size"]
    prompts = verify_prompts(vocab, n_prompts)
    expected = hf_greedy(model_dir, prompts, max_new_tokens)
    report = {}
    for v in variants:
        extra = {} if flash_attn is None else {"flash_attn": flash_attn}
        with open_variant(model_dir, v, n_threads=n_threads, **extra) as llm:
            report[v] = [first_mismatch(llm.greedy(p, max_new_tokens).tokens, e) for p, e in zip(prompts, expected)]
    return report


def main(argv: list[str] | None = None) -> None:
    from benchmarks.workloads import model_dir, offline

    parser = argparse.ArgumentParser(description="llama.cpp as a peer: verify against HF, or time it")
    parser.add_argument("what", choices=["verify", "bench"])
    parser.add_argument("--scale", choices=["full", "smoke"], default="full")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batched", action="store_true", help="bench: also run_batched with 16/64 sequences")
    parser.add_argument("--flash-attn", choices=["auto", "on", "off"], default=None,
                        help="override the variants' flash attention setting")
    args = parser.parse_args(argv)
    mdir = model_dir(args.scale)
    variants = args.variants.split(",")
    if args.what == "verify":
        for v, res in verify(mdir, variants, args.prompts, args.new_tokens, args.threads, args.flash_attn).items():
            print(f"{v}: first mismatch per prompt (None = identical over {args.new_tokens} tokens): {res}")
        return
    import random

    rng = random.Random(7)
    extra = {} if args.flash_attn is None else {"flash_attn": args.flash_attn}
    for v in variants:
        with open_variant(mdir, v, n_threads=args.threads, **extra) as llm:
            llm.greedy([5] * 16, 4)  # warm-up
            tpot, pp = [], []
            for _ in range(args.reps):
                tpot.append(llm.greedy([rng.randrange(3, llm.n_vocab) for _ in range(184)], 33).tpot_s)
                pp.append(512 / llm.greedy([rng.randrange(3, llm.n_vocab) for _ in range(512)], 1).prompt_s)
            res, _ = llm.run_sequential(offline(args.scale))
            print(f"{v}: TPOT@~200 {statistics.median(tpot) * 1e3:.2f} ms  prefill@512 {statistics.median(pp):.0f} tok/s"
                  f"  offline sequential {res.output_tokens / res.wall_s:.0f} out tok/s ({res.wall_s:.2f} s)")
        if args.batched:
            for par in (16, 64):
                with open_variant(mdir, v, n_threads=args.threads, n_parallel=par, n_batch=2048, n_ctx=512,
                                  **extra) as llm:
                    res, _ = llm.run_batched(offline(args.scale))
                print(f"{v}: offline batched x{par} {res.output_tokens / res.wall_s:.0f} out tok/s ({res.wall_s:.2f} s)")


if __name__ == "__main__":
    main()
