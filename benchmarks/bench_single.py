"""One request at a time: fast, ref, HF transformers and llama.cpp side by side (issue 13).

    make bench                                            # full size (llama.cpp extra installed)
    pytest benchmarks/bench_single.py -p no:xdist         # the same, this file only
    pytest benchmarks --benchmark-disable                 # smoke: tiny model, proves it runs

- `test_single_tpot`: a 184-token prompt, 33 new tokens (greedy): the 32 decode steps run at
  184..216 tokens of context (~200). extra_info tpot_ms = median over rounds of each request's
  mean time per output token after the first. One engine instance serves every round (its
  construction and a warm-up request are not timed); each round's prompt is new and fast's
  prefix cache is off, so no round reuses another's KV. tpot_ms_best: the best round (on a
  shared machine the least disturbed one).
- `test_single_prefill`: a 512-token prompt, 1 new token: prefill_tok_s = 512 / median time to
  the first token.
- `test_offline_llamacpp`: llama.cpp on the offline workload (64 requests) of bench_engines.py,
  one request after another, and through its multi-sequence batch API (continuous batching,
  benchmarks/llamacpp_peer.py); group "offline", next to bench_engines' engines in the report.

HF is `generate` itself (batch 1, greedy, fp32), every new token timestamped by a streamer (its
`put` is called as each token is chosen). llama.cpp runs in
the three configurations of llamacpp_peer.VARIANTS, 2 threads; its cases skip when llama_cpp is not
importable (`pip install -e '.[llamacpp]'`, which `make bench` does).
"""

from __future__ import annotations

import itertools
import random
import statistics

import pytest
import torch

from benchmarks import llamacpp_peer
from benchmarks.harness import RunResult
from benchmarks.workloads import WORKLOADS

LLAMACPP_OK, LLAMACPP_WHY = llamacpp_peer.available()
LLAMACPP_THREADS = 2

SIZES = {  # scale -> (TPOT prompt, TPOT new tokens, prefill prompt, rounds)
    "full": (184, 33, 512, 7),
    "smoke": (12, 4, 24, 1),
}


def _vocab(model: str) -> int:
    from ref.config import ModelConfig

    return ModelConfig.from_pretrained(model).vocab_size


# ----------------------------------------------------------------------------- one request per engine

class StepEngine:
    """fast or ref: one request through add_request/step; returns (ttft_s, [time per new token])."""

    _ids = itertools.count()

    def __init__(self, kind: str, model: str):
        from ref.sampling_params import SamplingParams

        self._params = SamplingParams
        if kind == "fast":
            from fast import EngineConfig, LLMEngine

            self.engine = LLMEngine(EngineConfig(model=model, max_model_len=1024, enable_prefix_caching=False))
        else:
            from ref import EngineConfig, LLMEngine

            self.engine = LLMEngine(EngineConfig(model=model, max_model_len=1024, max_batch=1))

    def __call__(self, prompt: list[int], new: int) -> tuple[float, list[float]]:
        engine = self.engine
        t0 = llamacpp_peer.CLOCK()
        engine.add_request(f"single-{next(self._ids)}", {"prompt_token_ids": prompt},
                           self._params(temperature=0.0, max_tokens=new, ignore_eos=True))
        stamps, seen = [], 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                n = len(out.outputs[0].token_ids)
                if n > seen:
                    stamps.extend([llamacpp_peer.CLOCK()] * (n - seen))
                    seen = n
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        return stamps[0] - t0, steps


class HFGenerate:
    """transformers' `generate` (batch 1, greedy, fp32), each new token timestamped by a streamer."""

    def __init__(self, model: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    @torch.inference_mode()
    def __call__(self, prompt: list[int], new: int) -> tuple[float, list[float]]:
        from transformers.generation.streamers import BaseStreamer

        stamps: list[float] = []

        class Stamps(BaseStreamer):
            def put(self, value):  # called with the prompt first, then with each new token
                stamps.append(llamacpp_peer.CLOCK())

            def end(self):
                pass

        ids = torch.tensor([prompt])
        t0 = llamacpp_peer.CLOCK()
        self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                            do_sample=False, eos_token_id=None, pad_token_id=0, streamer=Stamps())
        tokens = stamps[1:]
        assert len(tokens) == new
        return tokens[0] - t0, [b - a for a, b in zip(tokens, tokens[1:])]


class LlamaCppSingle:
    def __init__(self, variant: str, model: str):
        self.llm = llamacpp_peer.open_variant(model, variant, n_threads=LLAMACPP_THREADS)

    def __call__(self, prompt: list[int], new: int) -> tuple[float, list[float]]:
        gen = self.llm.greedy(prompt, new)
        return gen.prompt_s, gen.step_s


ENGINES = ["fast", "ref", "hf-generate", *(f"llamacpp-{v}" for v in llamacpp_peer.VARIANTS)]


def _make(engine: str, model: str):
    if engine.startswith("llamacpp-"):
        if not LLAMACPP_OK:
            pytest.skip(LLAMACPP_WHY)
        return LlamaCppSingle(engine.removeprefix("llamacpp-"), model)
    if engine == "hf-generate":
        return HFGenerate(model)
    return StepEngine(engine, model)


_ENGINE_CACHE: dict[tuple[str, str], object] = {}


def _engine(engine: str, model: str):
    key = (engine, model)
    if key not in _ENGINE_CACHE:
        _ENGINE_CACHE.clear()  # one engine alive at a time: no memory or threads held by the others
        _ENGINE_CACHE[key] = _make(engine, model)
        _ENGINE_CACHE[key]([3, 4, 5, 6], 3)  # warm-up (first-call allocations, lazy init)
    return _ENGINE_CACHE[key]


def _rounds(benchmark, run, prompt_len: int, new: int, rounds: int, vocab: int, seed: int):
    """`rounds` requests with fresh random prompts under benchmark.pedantic; per-round results."""
    rng = random.Random(seed)
    results: list[tuple[float, list[float]]] = []

    def setup():
        return ([rng.randrange(3, vocab) for _ in range(prompt_len)],), {}

    def one(prompt):
        results.append(run(prompt, new))

    benchmark.pedantic(one, setup=setup, rounds=rounds, iterations=1)
    return results


@pytest.mark.parametrize("engine", ENGINES)
def test_single_tpot(benchmark, bench_model, scale, engine):
    prompt_len, new, _, rounds = SIZES[scale]
    run = _engine(engine, bench_model)
    benchmark.group = "single-request TPOT"
    results = _rounds(benchmark, run, prompt_len, new, rounds, _vocab(bench_model), seed=11)
    per_request = [sum(steps) / len(steps) for _, steps in results]
    assert all(len(steps) == new - 1 for _, steps in results)
    wall = statistics.median(ttft + sum(steps) for ttft, steps in results)
    info = RunResult(engine, "single-tpot", wall, new, prompt_len, [r[0] for r in results], per_request).extra_info()
    info.update(tpot_ms=statistics.median(per_request) * 1e3, tpot_ms_best=min(per_request) * 1e3,
                context_tokens=f"{prompt_len}..{prompt_len + new - 1}", rounds=rounds)
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("engine", ENGINES)
def test_single_prefill(benchmark, bench_model, scale, engine):
    _, _, prompt_len, rounds = SIZES[scale]
    run = _engine(engine, bench_model)
    benchmark.group = "single-request prefill"
    results = _rounds(benchmark, run, prompt_len, 1, rounds, _vocab(bench_model), seed=12)
    ttft = [r[0] for r in results]
    info = RunResult(engine, "single-prefill", statistics.median(ttft), 1, prompt_len, ttft).extra_info()
    info.update(prefill_tok_s=prompt_len / statistics.median(ttft), prefill_tok_s_best=prompt_len / min(ttft),
                prompt_tokens=prompt_len, rounds=rounds)
    benchmark.extra_info.update(info)


# ----------------------------------------------------------------------------- llama.cpp, offline workload

LLAMACPP_OFFLINE = [f"{v}-{mode}" for v in llamacpp_peer.VARIANTS for mode in ("sequential", "batched")]


@pytest.mark.skipif(not LLAMACPP_OK, reason=LLAMACPP_WHY)
@pytest.mark.parametrize("case", LLAMACPP_OFFLINE)
def test_offline_llamacpp(benchmark, bench_model, scale, case):
    variant, mode = case.rsplit("-", 1)
    workload = WORKLOADS["offline"](scale)
    benchmark.group = "offline"
    longest = max(len(p) + m for p, m in zip(workload.prompts, workload.max_tokens))
    n_parallel = len(workload.prompts) if mode == "batched" else 1
    _ENGINE_CACHE.clear()
    with llamacpp_peer.open_variant(bench_model, variant, n_threads=LLAMACPP_THREADS, n_parallel=n_parallel,
                                    n_ctx=max(256, longest), n_batch=2048 if mode == "batched" else 512) as llm:
        llm.greedy([3, 4, 5, 6], 3)  # warm-up
        run = llm.run_batched if mode == "batched" else llm.run_sequential
        result, _ = benchmark.pedantic(run, args=(workload, f"llama.cpp-{case}"), rounds=1, iterations=1)
    benchmark.extra_info.update(result.extra_info())
    benchmark.extra_info.update(n_parallel=n_parallel, threads=LLAMACPP_THREADS)
