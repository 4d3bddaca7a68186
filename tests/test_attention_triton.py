"""The Triton paged-attention kernels against the dense reference: on a GPU, else in the interpreter.

Without CUDA, TRITON_INTERPRET=1 is set here, before anything imports the kernel module (triton
reads it when `@triton.jit` runs). The interpreter is slow, so batches are small unless the
Hypothesis profile is `deep` or a GPU is present.
"""

from __future__ import annotations

import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given  # noqa: E402

from fast.attention import get_backend  # noqa: E402
from fast.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from conformance.kernels import (  # noqa: E402
    BatchSpec,
    CaseLimits,
    SequenceSpec,
    batch_specs,
    build_batch,
    check_backend_matches_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "dev")
# Split-KV is meant for decode: a forced split on prefill rows multiplies the interpreter's work,
# so off the GPU it is drawn on decode batches (plus one fixed mixed batch below).
if ON_GPU or PROFILE == "deep":
    LIMITS = SPLIT_LIMITS = CaseLimits()
elif PROFILE == "ci":
    LIMITS = CaseLimits(max_seq_len=96, max_seqs=3, max_kv_heads=2)
    SPLIT_LIMITS = CaseLimits(max_seq_len=200, max_seqs=3, max_kv_heads=1, kinds=("decode",))
else:
    LIMITS = CaseLimits(max_seq_len=160, max_seqs=4, max_kv_heads=2)
    SPLIT_LIMITS = CaseLimits(max_seq_len=400, max_seqs=4, max_kv_heads=2, kinds=("decode",))


@given(batch_specs(LIMITS))
def test_triton_backend_matches_dense_reference(spec: BatchSpec) -> None:
    """Mixed batches over random block tables equal the dense oracle; unused slots hold NaN."""
    batch = build_batch(spec, DEVICE, unused_fill=float("nan"))
    check_backend_matches_reference(TritonAttentionBackend(DEVICE), batch)


@given(batch_specs(SPLIT_LIMITS))
def test_triton_split_kv_matches_dense_reference(spec: BatchSpec) -> None:
    """Forcing split-KV (4 segments, some of them empty for short contexts) changes nothing."""
    batch = build_batch(spec, DEVICE, unused_fill=float("nan"))
    check_backend_matches_reference(TritonAttentionBackend(DEVICE, num_kv_splits=4), batch)


def test_triton_split_kv_on_a_mixed_batch() -> None:
    """A forced split also holds for prefill chunks and fresh prefills beside a decode."""
    spec = BatchSpec(
        dtype=torch.float32, block_size=16, num_kv_heads=2, group=4, head_dim=32, num_blocks=12,
        sliding_window=None, q_gain=1.0,
        seqs=(SequenceSpec(5, 40, (7, 2, 9)), SequenceSpec(1, 33, (0, 11, 4)), SequenceSpec(17, 17, (5, 1))),
        seed=3,
    )
    batch = build_batch(spec, DEVICE, unused_fill=float("nan"))
    check_backend_matches_reference(TritonAttentionBackend(DEVICE, num_kv_splits=2), batch)


def test_get_backend_triton_and_auto() -> None:
    """"auto" is triton on a GPU, the C++ "cpu" kernel on CPU (torch where it cannot be built)."""
    from fast.attention.cpu_backend import CpuKernelUnavailable, load_kernel

    assert isinstance(get_backend("triton", DEVICE), TritonAttentionBackend)
    if ON_GPU:
        assert get_backend("auto", DEVICE).name == "triton"
    else:
        try:
            load_kernel()
            expected = "cpu"
        except CpuKernelUnavailable:
            expected = "torch"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's warning (tested elsewhere)
            assert get_backend("auto", DEVICE).name == expected


@pytest.mark.parametrize("splits", [0, 3, 32])
def test_triton_rejects_bad_split_count(splits: int) -> None:
    with pytest.raises(ValueError, match="num_kv_splits"):
        TritonAttentionBackend(DEVICE, num_kv_splits=splits)


def test_engine_runs_on_the_triton_backend(tiny_model_dir) -> None:
    """The whole fast engine with Triton attention (interpreted on CPU) equals the oracle."""
    from conformance.compare import check_request_outputs
    from fast import LLM, SamplingParams
    from ref import LLM as RefLLM

    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 17, 9)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm = LLM(tiny_model_dir, attention_backend="triton", device=DEVICE, max_model_len=64, block_size=8,
              max_num_batched_tokens=16, max_num_seqs=4)
    assert llm.llm_engine.executor.driver_call("attention_backend_name") == "triton"
    got = llm.generate(prompts, params, use_tqdm=False)
    oracle = RefLLM(tiny_model_dir, max_model_len=64)
    e = oracle.llm_engine
    check_request_outputs(e.model, e.model_config.eos_token_ids,
                          [(p["prompt_token_ids"], params) for p in prompts], oracle.generate(prompts, params), got)


def test_launch_shape_is_the_launch_forward_uses() -> None:
    """`launch_shape` is a pure function of sizes; its twin with fixed splits keeps the device."""
    from fast.attention import AttentionMetadata

    backend = TritonAttentionBackend(DEVICE)
    decode = AttentionMetadata.from_lists([1, 1], [40, 9], [[0, 1, 2], [3]], 16, DEVICE)
    mixed = AttentionMetadata.from_lists([1, 20], [40, 20], [[0, 1, 2], [3, 4]], 16, DEVICE)
    shape = backend.launch_shape(8, (6, 16, 2, 48), decode)
    assert (shape.group, shape.heads_padded, shape.block_q, shape.head_dim_padded, shape.tile) == (4, 4, 4, 64, 32)
    assert backend.launch_shape(12, (6, 16, 2, 48), mixed).block_q == 64 // 8  # group 6 pads to 8 rows
    twin = backend.with_kv_splits(4)
    assert twin.device == backend.device and twin.launch_shape(8, (6, 16, 2, 48), decode).num_segments == 4
    if not ON_GPU:
        assert shape.num_segments == 1  # the automatic choice never splits off the GPU


def test_targeted_kernel_cases_reach_every_required_triton_path() -> None:
    """Classified by the launch the backend would choose (nothing runs): the fixed cases of the
    kernel tier reach every batch, launch and split-KV path."""
    from conformance.kernels import TARGETED_CASES, CaseLimits, KernelTier, build_batch

    tier = KernelTier({"triton": TritonAttentionBackend(DEVICE)}, {"triton": CaseLimits()})
    for case in TARGETED_CASES:
        tier.coverage.record("triton", tier.paths("triton", case.num_kv_splits, build_batch(case.spec)))
    assert tier.coverage.unreached() == {}, tier.coverage.unreached()


def test_launch_paths_follow_the_kernel_grid() -> None:
    """Hand-worked launches: the segments of each program, early exits, window-skipped tiles."""
    from conformance.kernels import fixed_spec, launch_paths
    from fast.attention.triton_backend import AttentionLaunch

    def launch(block_q: int, num_segments: int = 1, group: int = 1, head_dim_padded: int = 32) -> AttentionLaunch:
        return AttentionLaunch(group, group, head_dim_padded, block_q, 32, num_segments)

    # 3 tiles over 4 segments: 1, 1, 1, 0 tiles; over 2 segments: 2, 1.
    assert "split-KV: empty segment" in launch_paths(fixed_spec([(1, 70)], 16), launch(16, 4))
    two = launch_paths(fixed_spec([(1, 70)], 16), launch(16, 2))
    assert {"split-KV: short last segment", "split-KV: segment of several tiles"} <= two
    assert "split-KV: empty segment" not in two
    # 4 tiles over 2 segments: both full.
    assert "split-KV: short last segment" not in launch_paths(fixed_spec([(1, 128)], 16), launch(16, 2))
    # A 20-token prefill beside a decode with block_q 16: two query blocks, the decode's second exits.
    mixed = launch_paths(fixed_spec([(20, 20), (1, 5)], 16), launch(16))
    assert {"several query blocks per sequence", "query block past its sequence's queries (early exit)",
            "BLOCK_M 16 (launch with prefills)"} <= mixed
    # Window 10 at position 69: keys 60..69 lie in tile 1 and 2 only.
    assert "sliding window skips whole tiles" in launch_paths(fixed_spec([(1, 70)], 16, sliding_window=10), launch(16))
    assert "sliding window skips whole tiles" not in launch_paths(fixed_spec([(1, 70)], 16, sliding_window=40), launch(16))
