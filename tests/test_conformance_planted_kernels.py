"""The kernel tier catches planted attention bugs, naming the targeted case that exposes each.

Triton bugs are planted in a patched copy of fast/attention/triton_backend.py whose kernels
replace fast's for the test (the backend looks its kernels up at each launch); torch bugs by
monkeypatching. The suite's own kernel check (conformance/tiers.py) then runs in this process.
Several of these bugs went unnoticed by the random batches alone (no split-KV off the GPU, one
kv head per Triton batch): the targeted cases are what catches them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from conformance.adapters import FastAdapter  # noqa: E402
from conformance.runner import CheckResult, run_check  # noqa: E402
from conformance.tiers import CHECKS, MAX_MODEL_LEN, Context, Profile  # noqa: E402

PROFILE = Profile("planted", examples=4, max_requests=4, stateful_steps=10, families=False, kernel_max_seq_len=64)


def run_kernel_tier(model_dir: str) -> CheckResult:
    check = next(c for c in CHECKS if c.tier == "kernel")
    make = lambda d, **o: FastAdapter(d, **o)  # noqa: E731
    ctx = Context(adapter=make(model_dir, max_model_len=MAX_MODEL_LEN), model_dir=model_dir, profile=PROFILE,
                  make_adapter=make)
    return run_check(check, ctx, seed=1234, shrink=False, replay="")


def patched_copy(module, old: str, new: str, tmp_path: Path, monkeypatch):
    """A copy of `module` with `old` replaced by `new` in its source, imported under a new name."""
    source = Path(module.__file__).read_text()
    assert source.count(old) == 1, f"the line to plant the bug in moved: {old!r}"
    path = tmp_path / f"planted_{module.__name__.rsplit('.', 1)[-1]}.py"
    path.write_text(source.replace(old, new))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    copy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, copy)  # dataclasses look their module up
    spec.loader.exec_module(copy)
    return copy


@pytest.fixture
def plant_triton(tmp_path, monkeypatch):
    """plant(old, new): fast's Triton kernels become those of a copy of the module with `old` replaced."""
    import fast.attention.triton_backend as tb

    def plant(old: str, new: str) -> None:
        copy = patched_copy(tb, old, new, tmp_path, monkeypatch)
        monkeypatch.setattr(tb, "_paged_attention_kernel", copy._paged_attention_kernel)
        monkeypatch.setattr(tb, "_reduce_segments_kernel", copy._reduce_segments_kernel)

    return plant


def assert_caught(result: CheckResult, *words: str) -> None:
    assert result.status == "failed", "the planted kernel bug went unnoticed"
    first_line = result.message.splitlines()[0]
    for word in words:
        assert word in first_line, first_line


def test_clean_kernels_pass(tiny_model_dir):
    result = run_kernel_tier(tiny_model_dir)
    assert result.status == "passed", result.message


def test_split_kv_reduce_dropping_the_last_segment_is_caught(tiny_model_dir, plant_triton):
    plant_triton("weight = tl.exp2(seg_max - m_safe)",
                 "weight = tl.where(segments < NUM_SEGMENTS - 1, tl.exp2(seg_max - m_safe), 0.0)")
    assert_caught(run_kernel_tier(tiny_model_dir), "kernel case 'split-KV x2", "triton(num_kv_splits=2)",
                  "elements differ")


def test_gqa_heads_interleaved_is_caught(tiny_model_dir, plant_triton):
    """Query head h read kv head h % num_kv_heads (repeat instead of repeat_interleave): only a
    batch with several kv heads and a group above 1 can tell."""
    plant_triton("head = kv_head * GROUP + head_in_group", "head = head_in_group * NUM_KV_HEADS + kv_head")
    assert_caught(run_kernel_tier(tiny_model_dir), "kernel case 'decode-only: GQA 8 over 2 kv heads", "on triton:")


def test_block_lookup_off_by_one_at_a_block_boundary_is_caught(tiny_model_dir, plant_triton):
    """The first position of each block looks up the previous block's table entry."""
    plant_triton("block_tables_ptr + seq * stride_block_table + k_pos // BLOCK_SIZE",
                 "block_tables_ptr + seq * stride_block_table + tl.maximum(k_pos - 1, 0) // BLOCK_SIZE")
    assert_caught(run_kernel_tier(tiny_model_dir), "kernel case 'decode-only: unequal contexts", "on triton:")


def test_one_block_lookup_per_tile_is_caught(tiny_model_dir, plant_triton):
    """A tile assumed to be one cache block: its later positions read the first block's slots."""
    plant_triton("block_tables_ptr + seq * stride_block_table + k_pos // BLOCK_SIZE",
                 "block_tables_ptr + seq * stride_block_table + (tile * TILE + 0 * k_pos) // BLOCK_SIZE")
    assert_caught(run_kernel_tier(tiny_model_dir), "kernel case 'decode-only: unequal contexts", "on triton:")


def test_online_softmax_without_rescale_is_caught(tiny_model_dir, plant_triton):
    """The accumulator is not rescaled when a later tile raises the running max."""
    plant_triton("acc = acc * alpha[:, None] + tl.dot(", "acc = acc + tl.dot(")
    assert_caught(run_kernel_tier(tiny_model_dir), "kernel case", "on triton:", "elements differ")


def test_torch_decode_window_one_short_is_caught(tiny_model_dir, tmp_path, monkeypatch):
    """The torch decode path drops the oldest key of a sliding window (> instead of >=)."""
    import fast.attention.torch_backend as tb

    copy = patched_copy(tb, "visible & (key_pos[None, :] >= first_visible)",
                        "visible & (key_pos[None, :] > first_visible)", tmp_path, monkeypatch)
    monkeypatch.setattr(tb.TorchAttentionBackend, "_decode", copy.TorchAttentionBackend._decode)
    assert_caught(run_kernel_tier(tiny_model_dir), "kernel case 'decode-only: GQA 2 over 2 kv heads", "window",
                  "on torch:")


def test_split_kv_knob_ignored_fails_the_coverage_minimum(tiny_model_dir, monkeypatch):
    """num_kv_splits silently ignored off the GPU: every result is right, but no case reaches
    split-KV any more, and the check fails listing the unreached paths."""
    from fast.attention.triton_backend import TritonAttentionBackend

    monkeypatch.setattr(TritonAttentionBackend, "kv_splits_for", lambda self, device, heads, metadata: 1)
    assert_caught(run_kernel_tier(tiny_model_dir), "kernel paths never reached (coverage minimum)",
                  "triton: split-KV, split-KV on a launch with prefills")


# ----------------------------------------------------------------------------- allocator: prefix caching under adversity
# The allocator tier's weak hash (3 buckets, salt-blind) makes most blocks collide; its scripted
# scenarios then fail on any lookup that trusts less than the whole prefix and salt.

def run_allocator_tier(model_dir: str) -> CheckResult:
    check = next(c for c in CHECKS if c.tier == "allocator")
    make = lambda d, **o: FastAdapter(d, **o)  # noqa: E731
    ctx = Context(adapter=make(model_dir, max_model_len=MAX_MODEL_LEN), model_dir=model_dir, profile=PROFILE,
                  make_adapter=make)
    return run_check(check, ctx, seed=None, shrink=False, replay="")  # derandomized: reproducible


def test_clean_allocator_passes(tiny_model_dir):
    result = run_allocator_tier(tiny_model_dir)
    assert result.status == "passed", result.message


def test_hash_only_cache_lookup_is_caught(tiny_model_dir, monkeypatch):
    """The pool returns whatever block holds the hash, without comparing the tokens."""
    from fast.core.block_pool import BlockPool

    monkeypatch.setattr(BlockPool, "lookup", lambda self, key: self._cache_index.get(key.block_hash))
    assert_caught(run_allocator_tier(tiny_model_dir), "allocator scenario", "on Allocator_weak_hash", "model expects []")


def test_lookup_comparing_only_the_last_block_is_caught(tiny_model_dir, monkeypatch):
    """Keys compared on their own block's tokens and salt, not on the tokens before it. fast's own
    `check_invariants` would notice the broken key chain; it is switched off here, as in an
    allocator without one, to show the machine's model catches the wrong hit itself."""
    from fast.core.block_pool import BlockKey
    from fast.core.kv_cache_manager import KVCacheManager

    monkeypatch.setattr(KVCacheManager, "check_invariants", lambda self: None)

    def same_block(self, other):
        return (self.block_hash, self.token_ids, self.extra_keys) == (other.block_hash, other.token_ids, other.extra_keys)

    monkeypatch.setattr(BlockKey, "same_content", same_block)
    assert_caught(run_allocator_tier(tiny_model_dir),
                  "allocator scenario 'same_tokens_other_prefix' on Allocator_weak_hash", "model expects []")


def test_lookup_ignoring_the_salt_is_caught(tiny_model_dir, monkeypatch):
    """Keys compared on tokens and parents but not on the extra keys: with a salt-blind hash one
    tenant's lookup returns another tenant's KV."""
    from fast.core.block_pool import BlockKey

    def salt_blind(self, other):
        mine, theirs = self, other
        while mine is not theirs:
            if mine is None or theirs is None or (mine.block_hash, mine.token_ids) != (theirs.block_hash, theirs.token_ids):
                return False
            mine, theirs = mine.parent, theirs.parent
        return True

    monkeypatch.setattr(BlockKey, "same_content", salt_blind)
    result = run_allocator_tier(tiny_model_dir)
    assert_caught(result, "allocator scenario 'colliding_blocks' on Allocator_weak_hash", "model expects []")
    assert "lookup [0, 0, 0] salt='salt-a': hit blocks [0]" in result.message  # the salted lookup hit


def test_cache_index_evicting_a_block_in_use_is_caught(tiny_model_dir, monkeypatch):
    """A capped cache index drops its oldest entry to make room, even while requests hold that
    block (its own invariants stay true: only the machine's eviction rule can tell)."""
    from fast.core.block_pool import BlockPool

    original = BlockPool.cache_block

    def capped(self, block, key):
        if key.block_hash not in self._cache_index and len(self._cache_index) >= 2:
            oldest = next(iter(self._cache_index.values()))
            del self._cache_index[oldest.cache_key.block_hash]
            oldest.cache_key = None
        return original(self, block, key)

    monkeypatch.setattr(BlockPool, "cache_block", capped)
    assert_caught(run_allocator_tier(tiny_model_dir), "lost its cache entry (evicted) while", "held it")
