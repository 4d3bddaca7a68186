"""Decode attention bandwidth on a CUDA GPU, as a fraction of the device's peak.

    python benchmarks/gpu_bandwidth.py [--out DIR] [--peak-gbps GB/s] [--quick]

bandwidth = bytes of K/V the step must read (sum of seq_lens x num_kv_heads x head_dim x 2 x
element size; q, out and block tables are ignored, < 1%) / time of one forward (median, CUDA
events; replayed from a CUDA graph so Python launch overhead is excluded, else plain do_bench and
the result says so). Peak: --peak-gbps, else the spec-sheet figure of a known
device (PEAK_GBPS), else memory clock x bus width from the device properties when torch has them.
Each case is also checked against the torch backend (bf16 tolerance), so a wrong-but-fast
kernel cannot post a figure. Writes gpu_bandwidth.json and gpu_bandwidth.md to DIR ($OUT if
set, else benchmarks/gpu_results).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled

from conformance.compare import ATTENTION_TOL, assert_close  # noqa: E402
from fast.attention import AttentionMetadata, TorchAttentionBackend  # noqa: E402
from fast.attention.triton_backend import TritonAttentionBackend  # noqa: E402

# Llama-3-8B attention (32 query heads, 8 kv heads, head_dim 128) in bf16, 16-token blocks.
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
CASES = [(batch, ctx) for batch in (1, 8, 32, 128) for ctx in (1024, 4096, 16384)]
QUICK_CASES = [(1, 4096), (32, 4096)]

# Spec-sheet HBM/GDDR bandwidth, GB/s, by a substring of torch.cuda.get_device_name (checked in order).
PEAK_GBPS = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40 GB parts
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10", 600.0),
)


@dataclass
class Result:
    batch: int
    ctx: int
    variant: str
    num_kv_splits: str
    timer: str
    ms: float
    kv_bytes: int
    gbps: float
    fraction_of_peak: float


def peak_gbps(override: float | None) -> tuple[float, str]:
    """The denominator and where it came from."""
    if override:
        return override, "--peak-gbps"
    name = torch.cuda.get_device_name()
    for key, gbps in PEAK_GBPS:
        if key in name:
            return gbps, f"spec sheet ({key})"
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:  # double data rate
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "device properties (2 x clock x bus width)"
    raise SystemExit(f"unknown peak bandwidth for {name!r}: pass --peak-gbps")


def decode_step(batch: int, ctx: int, seed: int = 0):
    """A decode step of `batch` sequences of `ctx` tokens over shuffled blocks of an exact-size pool."""
    blocks_per_seq = -(-ctx // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    pool = list(range(num_blocks))
    random.Random(seed).shuffle(pool)
    tables = [pool[i * blocks_per_seq : (i + 1) * blocks_per_seq] for i in range(batch)]
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    k_cache = torch.randn(shape, generator=gen, device="cuda", dtype=DTYPE)
    v_cache = torch.randn(shape, generator=gen, device="cuda", dtype=DTYPE)
    q = torch.randn((batch, NUM_HEADS, HEAD_DIM), generator=gen, device="cuda", dtype=DTYPE)
    metadata = AttentionMetadata.from_lists([1] * batch, [ctx] * batch, tables, BLOCK_SIZE, "cuda")
    kv_bytes = 2 * batch * ctx * NUM_KV_HEADS * HEAD_DIM * k_cache.element_size()
    return q, k_cache, v_cache, metadata, kv_bytes


def measure(cases: list[tuple[int, int]], peak: float, on_case_done) -> list[Result]:
    """Time every variant on every case; `on_case_done(results)` after each case (partial reports)."""
    results = []
    variants = {
        "triton": TritonAttentionBackend("cuda"),  # split-KV chosen per step
        "triton-no-split": TritonAttentionBackend("cuda", num_kv_splits=1),
        "torch": TorchAttentionBackend(),
    }
    for batch, ctx in cases:
        q, k_cache, v_cache, metadata, kv_bytes = decode_step(batch, ctx)
        scale = HEAD_DIM**-0.5
        expected = variants["torch"].forward(q, k_cache, v_cache, metadata, scale)
        for name, backend in variants.items():
            out = backend.forward(q, k_cache, v_cache, metadata, scale)
            atol, rtol = ATTENTION_TOL[DTYPE]
            assert_close(f"{name} batch={batch} ctx={ctx}", out, expected, atol, rtol)
            ms, timer = time_ms(lambda: backend.forward(q, k_cache, v_cache, metadata, scale, out=out))
            splits = "-"
            if isinstance(backend, TritonAttentionBackend):
                splits = str(backend.kv_splits_for(q.device, NUM_KV_HEADS, metadata))
            gbps = kv_bytes / (ms * 1e-3) / 1e9
            results.append(Result(batch, ctx, name, splits, timer, ms, kv_bytes, gbps, gbps / peak))
            print(f"batch={batch:4d} ctx={ctx:6d} {name:16s} splits={splits:>2s} {ms:8.3f} ms ({timer}) "
                  f"{gbps:8.1f} GB/s {100 * gbps / peak:5.1f}% of peak", flush=True)
        del q, k_cache, v_cache, expected
        torch.cuda.empty_cache()
        on_case_done(results)
    return results


def time_ms(fn) -> tuple[float, str]:
    """Median ms of fn: CUDA-graph replay when it captures, else eager launches."""
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn), "cudagraph"
    except Exception as error:  # capture unsupported here: time eager launches instead
        print(f"  cudagraph timing failed ({type(error).__name__}: {error}); timing eagerly", flush=True)
        return triton.testing.do_bench(fn), "eager"


def write_report(results: list[Result], out_dir: Path, header: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_bandwidth.json").write_text(
        json.dumps({**header, "results": [asdict(r) for r in results]}, indent=2)
    )
    lines = [
        f"# Decode attention bandwidth on {header['device']}",
        "",
        f"Peak {header['peak_gbps']:.0f} GB/s ({header['peak_source']}); {header['shape']}; "
        f"torch {header['torch']}, triton {header['triton']}.",
        "",
        "| batch | ctx | variant | splits | timer | ms | GB/s | % of peak |",
        "|---:|---:|---|---:|---|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.batch} | {r.ctx} | {r.variant} | {r.num_kv_splits} | {r.timer} | {r.ms:.3f} | {r.gbps:.0f} | "
            f"{100 * r.fraction_of_peak:.1f} |"
        )
    (out_dir / "gpu_bandwidth.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "benchmarks/gpu_results"))
    parser.add_argument("--peak-gbps", type=float, default=None)
    parser.add_argument("--quick", action="store_true", help="two cases only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script measures GPU bandwidth")
    import triton

    peak, source = peak_gbps(args.peak_gbps)
    header = {
        "device": torch.cuda.get_device_name(),
        "peak_gbps": peak,
        "peak_source": source,
        "shape": f"{NUM_HEADS} heads / {NUM_KV_HEADS} kv heads / head_dim {HEAD_DIM}, {DTYPE}, block {BLOCK_SIZE}",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(json.dumps(header), flush=True)
    cases = QUICK_CASES if args.quick else CASES
    results = measure(cases, peak, lambda partial: write_report(partial, args.out, header))
    print(f"wrote {args.out / 'gpu_bandwidth.md'}")


if __name__ == "__main__":
    main()
