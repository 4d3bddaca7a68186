"""Each tier catches a planted bug: a defect injected into fast makes the suite fail, usefully.

The defects are monkeypatched into this process's fast engine (a copy of it, in effect), and the
suite's own checks (conformance/tiers.py) run against it with shrinking off.
"""

from __future__ import annotations

import torch

from conformance.adapters import FastAdapter
from conformance.runner import run_check
from conformance.tiers import CHECKS, MAX_MODEL_LEN, Context, Profile

PROFILE = Profile("planted", examples=12, max_requests=10, stateful_steps=40, families=False, kernel_max_seq_len=64)


def run(tier: str, name: str, model_dir: str):
    check = next(c for c in CHECKS if c.tier == tier and c.name == name)
    make = lambda d, **o: FastAdapter(d, **o)  # noqa: E731
    ctx = Context(adapter=make(model_dir, max_model_len=MAX_MODEL_LEN), model_dir=model_dir, profile=PROFILE,
                  make_adapter=make)
    return run_check(check, ctx, seed=1234, shrink=False, replay="")


def test_clean_engine_passes_the_checks_used_below(tiny_model_dir):
    for tier, name in [("e2e", "workloads_vs_oracle"), ("allocator", "state_machine"),
                       ("determinism", "batch_invariance")]:
        result = run(tier, name, tiny_model_dir)
        assert result.status == "passed", result.message


def test_off_by_one_slot_is_caught(tiny_model_dir, monkeypatch):
    from fast.kv_cache_manager import KVCacheManager

    original = KVCacheManager.slot_mapping

    def shifted(self, request_id, start, end):
        total = self.config.num_blocks * self.block_size
        return [(s + 1) % total for s in original(self, request_id, start, end)]

    monkeypatch.setattr(KVCacheManager, "slot_mapping", shifted)
    result = run("e2e", "workloads_vs_oracle", tiny_model_dir)
    assert result.status == "failed"
    assert "differs" in result.message and "oracle" in result.message  # names the token and both values


def test_missing_causal_mask_is_caught(tiny_model_dir, monkeypatch):
    import fast.attention.torch_backend as tb

    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    class NoCausal:
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        @staticmethod
        def scaled_dot_product_attention(q, k, v, attn_mask=None, scale=None):
            if attn_mask is not None and attn_mask.dim() == 2:  # the prefill-chunk path's causal mask
                attn_mask = None
            return real_sdpa(q, k, v, attn_mask=attn_mask, scale=scale)

    monkeypatch.setattr(tb, "F", NoCausal())
    result = run("kernel", "paged_vs_dense", tiny_model_dir)
    assert result.status == "failed"
    assert "elements differ" in result.message and "worst at" in result.message


def test_refcount_not_decremented_is_caught(tiny_model_dir, monkeypatch):
    from fast.block_pool import BlockPool

    def leaky_free(self, blocks):
        for block in blocks:
            if block.ref_cnt == 1:  # shared blocks never lose their reference
                block.ref_cnt = 0
                self._free.append(block)

    monkeypatch.setattr(BlockPool, "free_blocks", leaky_free)
    result = run("allocator", "state_machine", tiny_model_dir)
    assert result.status == "failed"
    assert "ref_cnt" in result.message


def test_wrong_rope_position_after_preemption_is_caught(tiny_model_dir, monkeypatch):
    from fast.model_runner import ModelRunner

    original = ModelRunner.prepare

    def prepare(self, scheduled, kv):
        inputs = original(self, scheduled, kv)
        row = 0
        for s in scheduled:
            # The recompute after a preemption places the recomputed tokens one position late;
            # later decodes are placed right, so relative distances are wrong.
            if s.request.num_preemptions and s.start + s.num_new_tokens < s.request.num_tokens + 1 \
                    and s.num_new_tokens > 1:
                inputs.positions[row: row + s.num_new_tokens] += 1
            row += s.num_new_tokens
        return inputs

    monkeypatch.setattr(ModelRunner, "prepare", prepare)
    result = run("e2e", "workloads_vs_oracle", tiny_model_dir)
    assert result.status == "failed"
    assert "differs" in result.message


def test_seed_ignored_in_batch_is_caught(tiny_model_dir, monkeypatch):
    import fast.engine
    from fast.sampler import SamplingRow

    def unseeded_row(params, prompt_ids, output_ids, generator):
        return SamplingRow(params, prompt_ids, output_ids, None if generator is None else torch.default_generator)

    monkeypatch.setattr(fast.engine, "SamplingRow", unseeded_row)
    result = run("determinism", "batch_invariance", tiny_model_dir)
    assert result.status == "failed"
    assert "differs" in result.message
