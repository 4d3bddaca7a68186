"""The batched sampler's time per step, beside the oracle's per-row sampler on the same rows.

    pytest benchmarks/bench_sampler.py --benchmark-only

One step's sampling of `rows` sequences from fp32 logits [rows, vocab] (`fast.worker.sampler.Sampler`,
one call), and `ref.sampler.sample` called once per row on the same logits and params (the
oracle's plain loop) as the peer, for greedy, temperature, top-k 50 and top-p 0.9 rows, at the
offline benchmark's shape (64 x 8192) and a serving shape (256 x 32000, a Llama-2 vocabulary).
extra_info: ms per step of each and fast's speedup over the oracle. Each round draws the noise
again from fresh generators (seeded: the two must pick the same tokens, which is asserted).

The sampler runs on the CPU on every device (the model runner copies the logits to the host):
on a GPU this time adds to each decode step (README "Regression tracking and GPU").
"""

from __future__ import annotations

import time

import pytest
import torch

from fast.worker.sampler import Sampler, SamplingRow
from ref.sampler import sample
from ref.sampling_params import SamplingParams

KINDS = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.8),
    "top_k": dict(temperature=0.8, top_k=50),
    "top_p": dict(temperature=0.8, top_p=0.9),
}


def _shapes(scale: str) -> list[tuple[int, int]]:
    return [(64, 8192), (256, 32000)] if scale == "full" else [(4, 512)]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("shape_index", [0, 1])
def test_sampler_step(benchmark, scale, kind, shape_index):
    shapes = _shapes(scale)
    if shape_index >= len(shapes):
        pytest.skip("one shape in smoke mode")
    rows, vocab = shapes[shape_index]
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3
    params = [SamplingParams(seed=i, max_tokens=8, **KINDS[kind]) for i in range(rows)]
    generators = lambda: [None if p.greedy else torch.Generator().manual_seed(p.seed) for p in params]  # noqa: E731
    sampler = Sampler((2,))

    def fast_step():
        batch = [SamplingRow(p, [1, 2, 3], [], g, []) for p, g in zip(params, generators())]
        return sampler(logits, batch).token_ids

    def ref_step():
        return [sample(logits[i], p, [1, 2, 3], [], (2,), g) for i, (p, g) in enumerate(zip(params, generators()))]

    assert fast_step() == ref_step()  # the same tokens: a fast wrong sampler posts no figure
    t0 = time.perf_counter()
    ref_step()
    ref_s = time.perf_counter() - t0
    benchmark.pedantic(fast_step, rounds=3 if scale == "full" else 1, iterations=1)
    benchmark.extra_info.update({"rows": rows, "vocab": vocab, "kind": kind, "ref_ms_per_step": 1e3 * ref_s})
    if benchmark.stats is not None:  # None under --benchmark-disable
        fast_s = benchmark.stats.stats.median
        benchmark.extra_info.update({"fast_ms_per_step": 1e3 * fast_s, "speedup_over_ref": ref_s / fast_s})
