"""Throughput of the paged KV allocator (host-side bookkeeping only, no KV tensors).

Each benchmark records `ops_per_call` in `extra_info` and, when timing is enabled, `ops_per_s`.
Run: `.venv/bin/python -m pytest benchmarks/bench_allocator.py` (add --benchmark-disable to
only check that they run).
"""

from __future__ import annotations

import random

from fast.core.kv_cache_manager import KVCacheConfig, KVCacheManager

NUM_BLOCKS = 4096
BLOCK_SIZE = 16
NUM_REQUESTS = 64
PROMPT_LEN = 512  # 32 blocks; 64 requests hold 2048 of the 4096 blocks
SHARED_PREFIX_LEN = 256  # a system prompt common to every request
DECODE_STEPS = 128


def record_throughput(benchmark, ops: int) -> None:
    benchmark.extra_info["ops_per_call"] = ops
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["ops_per_s"] = ops / benchmark.stats.stats.mean


def make_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(32000) for _ in range(SHARED_PREFIX_LEN)]
    tail_len = PROMPT_LEN - SHARED_PREFIX_LEN
    return [shared + [rng.randrange(32000) for _ in range(tail_len)] for _ in range(NUM_REQUESTS)]


def test_allocate_free(benchmark):
    """Allocate NUM_REQUESTS whole prompts, then free them: 2 * NUM_REQUESTS operations."""
    kv = KVCacheManager(KVCacheConfig(NUM_BLOCKS, BLOCK_SIZE, enable_prefix_caching=False))

    def allocate_then_free() -> None:
        for i in range(NUM_REQUESTS):
            assert kv.allocate_slots(f"r{i}", PROMPT_LEN)
        for i in range(NUM_REQUESTS):
            kv.free(f"r{i}")

    benchmark(allocate_then_free)
    kv.check_invariants()
    assert kv.num_free_blocks == NUM_BLOCKS
    record_throughput(benchmark, 2 * NUM_REQUESTS)


def test_decode_growth(benchmark):
    """One slot per request per step, as in decode: NUM_REQUESTS * DECODE_STEPS allocations."""
    kv = KVCacheManager(KVCacheConfig(NUM_BLOCKS, BLOCK_SIZE, enable_prefix_caching=False))

    def decode() -> None:
        for i in range(NUM_REQUESTS):
            assert kv.allocate_slots(f"r{i}", 1)
        for _ in range(DECODE_STEPS - 1):
            for i in range(NUM_REQUESTS):
                assert kv.allocate_slots(f"r{i}", 1)
        for i in range(NUM_REQUESTS):
            kv.free(f"r{i}")

    benchmark(decode)
    kv.check_invariants()
    record_throughput(benchmark, NUM_REQUESTS * DECODE_STEPS)


def test_prefix_lookup(benchmark):
    """Look up NUM_REQUESTS cached prompts (hash chain walk plus prefix comparison)."""
    kv = KVCacheManager(KVCacheConfig(NUM_BLOCKS, BLOCK_SIZE))
    prompts = make_prompts()
    for i, prompt in enumerate(prompts):
        assert kv.allocate_slots(f"r{i}", PROMPT_LEN, kv.get_computed_blocks(prompt))
        kv.cache_full_blocks(f"r{i}", prompt, PROMPT_LEN)

    def look_up_all() -> int:
        return sum(kv.get_computed_blocks(prompt).num_computed_tokens for prompt in prompts)

    hit_tokens = benchmark(look_up_all)
    assert hit_tokens == NUM_REQUESTS * (PROMPT_LEN - BLOCK_SIZE)  # all but the last block
    record_throughput(benchmark, NUM_REQUESTS)


def test_prefill_with_prefix_caching(benchmark):
    """Lookup, allocate, cache and free NUM_REQUESTS prompts sharing a system prompt."""
    kv = KVCacheManager(KVCacheConfig(NUM_BLOCKS, BLOCK_SIZE))
    prompts = make_prompts(seed=1)

    def prefill_all() -> None:
        for i, prompt in enumerate(prompts):
            hit = kv.get_computed_blocks(prompt)
            assert kv.allocate_slots(f"r{i}", PROMPT_LEN - hit.num_computed_tokens, hit)
            kv.cache_full_blocks(f"r{i}", prompt, PROMPT_LEN)
        for i in range(NUM_REQUESTS):
            kv.free(f"r{i}")

    benchmark(prefill_all)
    kv.check_invariants()
    assert kv.stats.hits > 0
    record_throughput(benchmark, NUM_REQUESTS)
