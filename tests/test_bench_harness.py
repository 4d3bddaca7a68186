"""Pure helpers of the benchmark harness: the contiguous (Orca) baselines, the GEMM floor's
candidates and bookkeeping, the KV monitor's arithmetic and the prefill profile's attribution."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from benchmarks import harness
from benchmarks.bench_prefill import classify
from benchmarks.workloads import Workload, model_dir


def test_contiguous_concurrency_admits_fcfs_and_frees_at_finish():
    # reservations of 5 in 10 slots: two run for 3 steps, then the third alone for 3
    c = harness.contiguous_concurrency([(2, 3)] * 3, 10, lambda p, m: p + m)
    assert c == {"max": 2, "mean": 1.5, "saturated_mean": 2.0, "steps": 6}


def test_contiguous_concurrency_no_overtaking():
    # 11 slots: b (8) waits for a (6) to finish, and c (3) waits behind b though it would fit:
    # [a] [a] [b, c] [b, c] [c]; with overtaking it would be [a, c] [a, c] [b, c] [b]
    c = harness.contiguous_concurrency([(4, 2), (6, 2), (0, 3)], 11, lambda p, m: p + m)
    assert c == {"max": 2, "mean": 7 / 5, "saturated_mean": 1.0, "steps": 5}
    with pytest.raises(ValueError, match="budget"):
        harness.contiguous_concurrency([(20, 1)], 10, lambda p, m: p + m)


def test_orca_baselines_order_at_equal_memory():
    w = Workload("w", [[1] * 100, [1] * 30, [1] * 200, [1] * 10] * 4, [20, 50, 10, 90] * 4, max_model_len=512)
    b = harness.orca_baselines(w, 1024)
    assert b["orca_max_concurrency_max"] == 1024 // 512
    assert b["orca_max_concurrency_mean"] <= b["orca_pow2_concurrency_mean"] <= b["orca_oracle_concurrency_mean"]
    assert b["orca_oracle_concurrency_max"] >= b["orca_pow2_concurrency_max"] >= b["orca_max_concurrency_max"]


def test_gemm_floor_names_the_candidate_that_set_it():
    f = harness.GemmFloor(1.0, {"a": 0.9, "b": 0.1, "c": 0.0}, {"a": 1.2, "b": 2.0, "c": 3.0}, 1e9)
    assert f.impl == "a 90% + b 10%"
    assert harness.GemmFloor(1.0, {"a": 0.999, "b": 0.001}, {}, 0).impl == "a"
    info = f.info()
    assert info["gemm_floor_s"] == 1.0 and info["gemm_floor_impl"] == f.impl


def test_gemm_candidates_exist_and_compute_the_linear():
    impls = harness.gemm_impls()
    assert impls[0].name == "F.linear"
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    for impl in impls:
        torch.testing.assert_close(impl.run(x, impl.prepare(w, 3)), x @ w.T, rtol=1e-4, atol=1e-4)


def test_gemm_floor_replays_step_counts_on_the_checkpoint():
    timer = harness.GemmTimer(model_dir("smoke"), reps=1)
    kinds, lm_head = timer.kinds, timer.lm_head
    assert set(kinds) == set(harness.LINEAR_KINDS) and len(kinds["qkv"]) == 2
    assert kinds["qkv"][0].shape == (16 * 4 + 2 * 16 * 2, 64) and lm_head.shape == (512, 64)
    one = timer.floor([(5, 1)])
    two = timer.floor([(5, 1), (5, 1)])
    assert two.seconds == pytest.approx(2 * one.seconds)  # cached per row count
    assert two.gemm_flops == 2 * one.gemm_flops
    assert sum(two.set_by.values()) == pytest.approx(two.seconds)
    assert all(two.seconds <= t + 1e-12 for t in two.by_impl.values())


def test_kv_monitor_gap_is_the_last_blocks():
    running = [SimpleNamespace(num_computed_tokens=t) for t in (17, 32, 1)]
    kv = SimpleNamespace(num_free_blocks=10 - 5)  # 2 + 2 + 1 blocks held
    engine = SimpleNamespace(config=SimpleNamespace(block_size=16), num_blocks=10, kv=kv,
                             scheduler=SimpleNamespace(running=running))
    mon = harness.KVMonitor(engine)
    mon()
    assert mon.utilization == pytest.approx(50 / 80)
    s = mon.stats()
    assert s["kv_waste_per_request"] == pytest.approx(30 / 3)
    assert s["kv_util_if_block_size"]["16"] == pytest.approx(50 / 80)
    assert s["kv_util_if_block_size"]["1"] == 1.0
    assert s["kv_pool_usage_peak"] == pytest.approx(0.5)
    running[:] = running[:1]  # 17 tokens in 2 blocks
    kv.num_free_blocks = 8
    mon()
    assert mon.utilization == pytest.approx(67 / 112)  # a ratio of totals...
    assert mon.stats()["kv_utilization_step_mean"] == pytest.approx((50 / 80 + 17 / 32) / 2)  # ...not a mean
    assert mon.stats()["kv_utilization_at_peak"] == pytest.approx(50 / 80)


def test_profile_attribution():
    fwd = "fast/worker/model.py(245): forward"
    runner = "fast/worker/model_runner.py(83): execute_model"
    lin = ["fast/worker/linear_kernel.py(39): packed_linear", "fast/worker/parallel.py(224): _gemm", fwd, runner]
    assert classify("mkldnn::_linear_pointwise", [], lin) == "gemm"
    assert classify("aten::embedding", [], ["fast/worker/parallel.py(355): forward", fwd, runner]) == "embedding"
    assert classify("aten::bmm", [], ["fast/attention/torch_backend.py(132): _chunk", fwd]) == "attention"
    assert classify("aten::index_copy_", [], ["fast/attention/torch_backend.py(74): store_kv", fwd]) == "kv-store"
    assert classify("aten::mean", [], ["fast/worker/model.py(42): rms_norm", fwd]) == "norm"
    assert classify("aten::cat", [], ["fast/worker/model.py(51): rotate_half", fwd]) == "rope"
    assert classify("aten::add", [[4, 2, 16], [4, 2, 16]], [fwd, runner]) == "rope"
    assert classify("aten::add", [[4, 64], [4, 64]], [fwd, runner]) == "residual"
    assert classify("aten::silu", [[4, 128]], [fwd, runner]) == "activation"
    assert classify("aten::argmax", [], ["fast/worker/sampler.py(43): __call__", runner]) == "sampler"
    assert classify("aten::arange", [], ["fast/attention/metadata.py(131): from_lists",
                                         "fast/worker/model_runner.py(132): prepare"]) == "runner (inputs/outputs)"
    assert classify("aten::empty", [], ["fast/core/scheduler.py(10): schedule"]) == "engine (scheduler, outputs)"


def test_gpu_throughput_script_runs_on_cpu(tmp_path):
    """benchmarks/gpu_throughput.py (run by gpu.sh on a GPU) in its CPU smoke mode: every row runs,
    every engine produced exactly requests x max_tokens tokens, the floor replays fast's steps."""
    import json

    from benchmarks import gpu_throughput

    assert gpu_throughput.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu_throughput.json").read_text())
    w = results["workload"]
    rows = {r["engine"].split("[")[0]: r for r in results["rows"]}
    assert set(rows) == {"fast", "hf-generate", "gemm-floor"} and len(results["rows"]) == 4
    for r in results["rows"][:3]:
        assert r["output_tokens"] == w["num_requests"] * w["max_tokens"]
    assert 0 < rows["gemm-floor"]["wall_s"] and rows["gemm-floor"]["gemm_flops"] > 0
    assert "| fast[" in (tmp_path / "gpu_throughput.md").read_text()
