"""KVCacheManager scenarios: the subtle cases of prefix caching, allocation, fork and free.

Every test calls `check_invariants()` after every operation (through the helpers below).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fast.core.kv_cache_manager import BlockCopy, KVCacheConfig, KVCacheManager, PrefixHit


def make(num_blocks: int = 8, block_size: int = 2, **kwargs) -> KVCacheManager:
    kv = KVCacheManager(KVCacheConfig(num_blocks, block_size, **kwargs))
    kv.check_invariants()
    return kv


def add(
    kv: KVCacheManager, request_id: str, tokens: list[int], salt: str | None = None, compute: bool = True
) -> PrefixHit:
    """Look up, allocate the whole prompt and (by default) run its forward, as a scheduler would."""
    hit = kv.get_computed_blocks(tokens, salt)
    assert kv.allocate_slots(request_id, len(tokens) - hit.num_computed_tokens, hit)
    kv.check_invariants()
    if compute:
        run_forward(kv, request_id, tokens)
    return hit


def run_forward(kv: KVCacheManager, request_id: str, tokens: list[int]) -> None:
    kv.cache_full_blocks(request_id, tokens, kv.get_num_tokens(request_id))
    kv.check_invariants()


def free(kv: KVCacheManager, *request_ids: str) -> None:
    for request_id in request_ids:
        kv.free(request_id)
        kv.check_invariants()


def state(kv: KVCacheManager, *request_ids: str) -> tuple:
    tables = {rid: (kv.get_block_table(rid), kv.get_num_tokens(rid)) for rid in request_ids}
    return kv.free_block_ids(), tables, kv.cached_block_ids(), kv.stats


# ---- free order and eviction ---------------------------------------------------------------------


def test_free_appends_each_request_tail_block_first():
    kv = make(num_blocks=8)
    add(kv, "a", [1, 2, 3, 4, 5])  # blocks 0 1 2
    add(kv, "b", [6, 7, 8])  # blocks 3 4
    free(kv, "a")
    assert kv.free_block_ids() == [5, 6, 7, 2, 1, 0]
    free(kv, "b")
    assert kv.free_block_ids() == [5, 6, 7, 2, 1, 0, 4, 3]
    assert kv.usage == 0.0


def test_evicting_a_cached_block_clears_its_hash():
    kv = make(num_blocks=3)
    add(kv, "a", [1, 2, 3])  # blocks 0 (cached) and 1
    free(kv, "a")
    assert kv.free_block_ids() == [2, 1, 0] and kv.cached_block_ids() == {0}
    add(kv, "b", [9, 9, 9, 9, 9], compute=False)  # takes 2, 1, then evicts 0
    assert kv.get_block_table("b") == [2, 1, 0]
    assert kv.cached_block_ids() == set() and kv.stats.blocks_evicted == 1
    free(kv, "b")
    assert kv.get_computed_blocks([1, 2, 3]).num_computed_tokens == 0


def test_every_block_is_free_after_all_requests_end():
    kv = make(num_blocks=6)
    add(kv, "a", [1, 2, 3, 4, 5])
    add(kv, "b", [1, 2, 3, 4, 6])
    assert kv.fork("b", "c") == [BlockCopy(src=3, dst=4)]
    kv.check_invariants()
    free(kv, "a", "c", "b")
    assert sorted(kv.free_block_ids()) == list(range(6)) and kv.usage == 0.0
    assert kv.cached_block_ids() == {0, 1}, "cached hashes outlive their requests"


# ---- prefix hits ---------------------------------------------------------------------------------


def test_full_prefix_hit_leaves_the_last_block_to_compute():
    """nano-vllm #114: a prompt fully in the cache must still compute its last token."""
    kv = make(num_blocks=8)
    prompt = [1, 2, 3, 4]
    add(kv, "a", prompt)
    assert kv.cached_block_ids() == {0, 1}
    free(kv, "a")
    hit = add(kv, "b", prompt)
    assert hit.block_ids == [0] and hit.num_computed_tokens == 2
    assert kv.get_block_table("b") == [0, 2] and kv.get_num_tokens("b") == 4
    assert kv.slot_mapping("b", 2, 4) == [4, 5]
    assert kv.cached_block_ids() == {0, 1}, "the recomputed duplicate of block 1 is not cached twice"


@pytest.mark.parametrize(
    "prompt, expected_hit",
    [
        ([1, 2], 0), ([1, 2, 3], 2), ([1, 2, 3, 4], 2), ([1, 2, 3, 4, 5], 4), ([1, 2, 3, 4, 5, 6], 4),
        ([1, 2, 3, 4, 5, 6, 7], 6), ([1, 2, 9, 4, 5, 6, 7], 2), ([2], 0),
    ],
)
def test_hit_is_whole_blocks_and_leaves_a_token(prompt, expected_hit):
    kv = make(num_blocks=8)
    add(kv, "a", [1, 2, 3, 4, 5, 6])
    hit = kv.get_computed_blocks(prompt)
    assert hit.num_computed_tokens == expected_hit
    assert len(hit.blocks) * 2 == expected_hit and expected_hit < len(prompt)


def test_hit_on_a_free_cached_block_takes_it_out_of_the_queue():
    kv = make(num_blocks=6)
    add(kv, "a", [1, 2, 3, 4, 5])  # blocks 0 1 cached, 2 partial
    free(kv, "a")
    assert kv.free_block_ids() == [3, 4, 5, 2, 1, 0]
    hit = add(kv, "b", [1, 2, 3, 4, 7], compute=False)
    assert hit.block_ids == [0, 1]
    assert kv.get_block_table("b") == [0, 1, 3]
    assert kv.free_block_ids() == [4, 5, 2]
    assert kv.stats.blocks_reused == 2 and kv.stats.blocks_evicted == 0


def test_failed_allocation_with_pending_hits_changes_nothing():
    """Hit blocks sitting in the free queue are not free blocks for the same allocation."""
    kv = make(num_blocks=4)
    add(kv, "a", [1, 2, 3, 4, 5])  # blocks 0 1 cached
    free(kv, "a")
    add(kv, "b", [9])  # takes block 3; free queue [2, 1, 0]
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    hit = kv.get_computed_blocks(prompt)
    assert hit.block_ids == [0, 1]
    before = state(kv, "b")
    assert not kv.allocate_slots("c", len(prompt) - hit.num_computed_tokens, hit)  # 3 fresh, 1 free
    kv.check_invariants()
    assert state(kv, "b") == before and not kv.has_request("c")
    assert kv.free_block_ids() == [2, 1, 0] and kv.cached_block_ids() == {0, 1}
    hit = kv.get_computed_blocks(prompt[:5])
    assert kv.allocate_slots("c", 1, hit)  # fits: 1 fresh block
    kv.check_invariants()
    assert kv.get_block_table("c") == [0, 1, 2]


def test_failed_growth_changes_nothing():
    kv = make(num_blocks=2)
    add(kv, "a", [1, 2, 3])
    before = state(kv, "a")
    assert not kv.allocate_slots("a", 2)
    kv.check_invariants()
    assert state(kv, "a") == before
    assert kv.allocate_slots("a", 1)  # fills the partial block, needs nothing new
    assert kv.get_num_tokens("a") == 4 and kv.get_block_table("a") == [0, 1]


def test_cache_disabled_never_hits():
    kv = make(num_blocks=8, enable_prefix_caching=False)
    for request_id in ("a", "b"):
        hit = add(kv, request_id, [1, 2, 3, 4, 5])
        assert hit.blocks == () and hit.num_computed_tokens == 0
        free(kv, request_id)
    assert kv.cached_block_ids() == set()
    assert kv.stats.hits == 0 and kv.stats.queries == 0


def test_salt_separates_otherwise_equal_prompts():
    kv = make(num_blocks=8)
    add(kv, "a", [1, 2, 3], salt="alice")
    assert kv.get_computed_blocks([1, 2, 3]).num_computed_tokens == 0
    assert kv.get_computed_blocks([1, 2, 3], "bob").num_computed_tokens == 0
    assert kv.get_computed_blocks([1, 2, 3], "alice").block_ids == [0]


def test_concurrent_identical_prompts_keep_the_first_cached_copy():
    kv = make(num_blocks=8)
    add(kv, "a", [1, 2, 3], compute=False)
    add(kv, "b", [1, 2, 3], compute=False)  # both missed: block 0 and block 2 hold the same KV
    run_forward(kv, "b", [1, 2, 3])
    run_forward(kv, "a", [1, 2, 3])
    assert kv.cached_block_ids() == {2}
    assert kv.get_computed_blocks([1, 2, 3, 4]).block_ids == [2]


def test_chunked_prefill_caches_only_full_computed_blocks():
    kv = make(num_blocks=8)
    prompt = [1, 2, 3, 4, 5, 6]
    assert kv.allocate_slots("a", 3, kv.get_computed_blocks(prompt))
    kv.cache_full_blocks("a", prompt, 3)
    kv.check_invariants()
    assert kv.cached_block_ids() == {0}
    assert kv.allocate_slots("a", 3)
    kv.cache_full_blocks("a", prompt, 6)
    kv.check_invariants()
    assert kv.cached_block_ids() == {0, 1, 2}
    assert kv.get_computed_blocks(prompt + [7]).block_ids == [0, 1, 2]


def test_hash_collision_never_returns_wrong_kv():
    kv = make(num_blocks=8, hash_fn=lambda parent, tokens, extra: 0)
    add(kv, "a", [1, 2, 3, 4, 5])  # block 0 cached; block 1's hash collides with it, so not cached
    assert kv.cached_block_ids() == {0}
    assert kv.get_computed_blocks([5, 6, 7]).num_computed_tokens == 0
    assert kv.get_computed_blocks([1, 2, 3, 4, 5]).block_ids == [0]


def test_parent_hash_collision_never_returns_wrong_kv():
    """Block 1 of [1 1 | 5 5] and of [2 2 | 5 5] have equal hashes, equal tokens and equal parent
    hashes; only comparing the whole prefix tells them apart."""
    kv = make(num_blocks=6, hash_fn=lambda parent, tokens, extra: hash((parent, len(tokens))))
    prompt = [1, 1, 5, 5, 9]
    add(kv, "a", prompt, compute=False)  # blocks 0 1 2
    add(kv, "f", prompt, compute=False)  # blocks 3 4 5
    kv.cache_full_blocks("a", prompt, 2)  # block 0 holds [1 1]
    kv.cache_full_blocks("f", prompt, 4)  # block 3 duplicates block 0; block 4 holds [1 1 | 5 5]
    kv.cache_full_blocks("a", prompt, 4)
    kv.check_invariants()
    assert kv.cached_block_ids() == {0, 4}
    free(kv, "a", "f")  # queue: 2 1 0 5 4 3
    add(kv, "b", [2, 2, 5, 5, 7])  # takes 2 1 0 (evicting 0); block 2 now holds [2 2]
    assert kv.cached_block_ids() == {2, 4}
    hit = kv.get_computed_blocks([2, 2, 5, 5, 7])
    assert hit.block_ids == [2], f"block 4 holds the KV of [1 1 5 5], got hit {hit.block_ids}"


def test_stale_hit_raises_instead_of_returning_evicted_kv():
    kv = make(num_blocks=2)
    add(kv, "a", [1, 2, 3])
    free(kv, "a")
    hit = kv.get_computed_blocks([1, 2, 3])
    assert hit.block_ids == [0]
    add(kv, "b", [7, 7, 7, 7], compute=False)  # evicts block 0
    free(kv, "b")
    with pytest.raises(ValueError, match="stale prefix hit"):
        kv.allocate_slots("c", 1, hit)
    kv.check_invariants()


def test_stats_count_tokens_and_reused_blocks():
    kv = make(num_blocks=8)
    add(kv, "a", [1, 2, 3, 4, 5])  # queries 5, hits 0, 3 fresh blocks
    add(kv, "b", [1, 2, 3, 4, 6])  # queries 5, hits 4, 2 reused + 1 fresh
    stats = kv.stats
    assert (stats.lookups, stats.queries, stats.hits) == (2, 10, 4)
    assert stats.hit_rate == pytest.approx(0.4)
    assert (stats.blocks_reused, stats.blocks_allocated) == (2, 4)
    assert stats.block_reuse_rate == pytest.approx(2 / 6)
    assert kv.usage == pytest.approx(4 / 8)


# ---- fork ----------------------------------------------------------------------------------------


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    kv = make(num_blocks=8)
    add(kv, "p", [1, 2, 3, 4, 5])  # blocks 0 1 2, block 2 partial
    copies = kv.fork("p", "c")
    kv.check_invariants()
    assert copies == [BlockCopy(src=2, dst=3)]
    assert kv.get_block_table("c") == [0, 1, 3] and kv.get_num_tokens("c") == 5
    assert kv.allocate_slots("c", 1) and kv.allocate_slots("p", 1)
    kv.check_invariants()
    assert kv.slot_mapping("c", 5, 6) == [7] and kv.slot_mapping("p", 5, 6) == [5]
    free(kv, "p")
    assert kv.free_block_ids() == [4, 5, 6, 7, 2], "shared blocks stay used until the child frees"


def test_fork_of_whole_blocks_copies_nothing():
    kv = make(num_blocks=4)
    add(kv, "p", [1, 2, 3, 4])
    assert kv.fork("p", "c") == []
    kv.check_invariants()
    assert kv.get_block_table("c") == [0, 1] and kv.free_block_ids() == [2, 3]


def test_failed_fork_changes_nothing():
    kv = make(num_blocks=2)
    add(kv, "p", [1, 2, 3])
    before = state(kv, "p")
    assert kv.fork("p", "c") is None
    kv.check_invariants()
    assert state(kv, "p") == before and not kv.has_request("c")


def test_fork_siblings_may_cache_shared_blocks_in_either_order():
    kv = make(num_blocks=8)
    prompt = [1, 2, 3, 4, 5]
    add(kv, "p", prompt, compute=False)
    kv.fork("p", "c")
    run_forward(kv, "c", prompt)
    run_forward(kv, "p", prompt)
    assert kv.cached_block_ids() == {0, 1}


# ---- slots, reset, misuse ------------------------------------------------------------------------


def test_slot_mapping_follows_the_block_table():
    kv = make(num_blocks=8, block_size=4)
    add(kv, "x", [9])  # block 0
    add(kv, "a", list(range(10)))  # blocks 1 2 3
    assert kv.slot_mapping("a", 0, 10) == [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert kv.slot_mapping("a", 3, 3) == []
    with pytest.raises(ValueError, match="outside"):
        kv.slot_mapping("a", 8, 11)


def test_reset_refuses_while_in_use_then_forgets_everything():
    kv = make(num_blocks=8)
    add(kv, "a", [1, 2, 3])
    assert not kv.reset_prefix_cache() and kv.cached_block_ids() == {0}
    free(kv, "a")
    assert kv.reset_prefix_cache()
    kv.check_invariants()
    assert kv.cached_block_ids() == set()
    assert kv.get_computed_blocks([1, 2, 3]).num_computed_tokens == 0


def test_misuse_raises():
    kv = make(num_blocks=8)
    add(kv, "a", [1, 2, 3])
    with pytest.raises(ValueError, match="first allocation"):
        kv.allocate_slots("a", 1, kv.get_computed_blocks([1, 2, 3]))
    with pytest.raises(ValueError, match="num_new_tokens"):
        kv.allocate_slots("a", -1)
    with pytest.raises(ValueError, match="exceeds"):
        kv.cache_full_blocks("a", [1, 2, 3, 4], 4)
    with pytest.raises(ValueError, match="already exists"):
        kv.fork("a", "a")
    with pytest.raises(KeyError, match="unknown request"):
        kv.free("nobody")
    with pytest.raises(KeyError, match="unknown request"):
        kv.get_block_table("nobody")
    kv.check_invariants()


@pytest.mark.parametrize("num_blocks, block_size, field", [(0, 2, "num_blocks"), (2, 0, "block_size")])
def test_config_names_the_bad_field(num_blocks, block_size, field):
    with pytest.raises(ValueError, match=field):
        KVCacheConfig(num_blocks, block_size)


@given(st.lists(st.tuples(st.sampled_from(["add", "free", "reset"]), st.integers(0, 3)), max_size=30))
def test_a_resumed_lookup_equals_a_fresh_one(ops):
    """A waiting request is looked up at every step, resuming from its last hit (`since`): under
    random adds (which cache and evict blocks), frees and resets, the resumed lookup finds the
    same blocks and keys as a lookup from scratch. A weak hash makes chains collide."""
    kv = make(num_blocks=6, block_size=2, hash_fn=lambda parent, tokens, extra: hash((parent, tokens)) % 5)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 9, 9, 9], [1, 2, 8, 8, 8], [3, 2, 3, 4, 5]]
    live: list[str] = []
    last: dict[int, PrefixHit] = {}
    for step, (op, p) in enumerate(ops):
        if op == "add":
            hit = kv.get_computed_blocks(prompts[p])
            if kv.allocate_slots(f"r{step}", len(prompts[p]) - hit.num_computed_tokens, hit):
                run_forward(kv, f"r{step}", prompts[p])
                live.append(f"r{step}")
        elif op == "free" and live:
            free(kv, live.pop(p % len(live)))
        elif op == "reset":
            kv.reset_prefix_cache()
        for i, prompt in enumerate(prompts):  # each prompt "waits": looked up after every op
            fresh, resumed = kv.get_computed_blocks(prompt), kv.get_computed_blocks(prompt, since=last.get(i))
            assert [b.block_id for b in resumed.blocks] == [b.block_id for b in fresh.blocks], (i, step)
            assert len(resumed.keys) == len(fresh.keys) and all(a is b for a, b in zip(resumed.keys, fresh.keys))
            assert resumed.num_computed_tokens == fresh.num_computed_tokens
            last[i] = resumed


def test_a_resumed_lookup_drops_blocks_reused_for_other_tokens():
    """The blocks of an earlier hit were evicted and now hold (and are cached with) other tokens:
    the resumed lookup must not keep them just because they carry a key."""
    kv = make(num_blocks=4, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    add(kv, "a", prompt)
    free(kv, "a")
    earlier = kv.get_computed_blocks(prompt)
    assert earlier.num_computed_tokens == 4
    add(kv, "x", [7, 8, 9, 10, 11, 12, 13, 14])  # takes all 4 blocks and caches them with its tokens
    free(kv, "x")
    assert all(block.cache_key is not None for block in earlier.blocks)
    resumed = kv.get_computed_blocks(prompt, since=earlier)
    assert resumed.num_computed_tokens == 0 and resumed.blocks == ()
