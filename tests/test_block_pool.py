"""BlockPool and FreeBlockQueue: eviction order, ref counts, the cache index, failure without side
effects. Every test calls `check_invariants()` after every operation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fast.core.block_pool import BlockId, BlockKey, BlockPool, FreeBlockQueue, KVCacheBlock


def key_for(*token_blocks: tuple[int, ...], hash_fn=None) -> BlockKey:
    """Key of the last of consecutive blocks holding `token_blocks`."""
    key = None
    for tokens in token_blocks:
        key = BlockKey.chain(key, tokens, ()) if hash_fn is None else BlockKey.chain(key, tokens, (), hash_fn)
    assert key is not None
    return key


def allocate(pool: BlockPool, num_blocks: int) -> list[KVCacheBlock]:
    blocks = pool.get_new_blocks(num_blocks)
    assert blocks is not None
    pool.check_invariants()
    return blocks


def ids(blocks: list[KVCacheBlock]) -> list[int]:
    return [block.block_id for block in blocks]


def test_new_pool_is_all_free_in_id_order():
    pool = BlockPool(num_blocks=5, block_size=4)
    pool.check_invariants()
    assert pool.free_block_ids() == [0, 1, 2, 3, 4]
    assert pool.num_free_blocks == 5 and pool.usage == 0.0 and pool.cached_block_ids() == set()


def test_get_new_blocks_pops_the_head_with_one_reference():
    pool = BlockPool(num_blocks=5, block_size=4)
    blocks = allocate(pool, 3)
    assert ids(blocks) == [0, 1, 2]
    assert [block.ref_cnt for block in blocks] == [1, 1, 1]
    assert pool.free_block_ids() == [3, 4]
    assert pool.usage == pytest.approx(0.6)


def test_allocating_more_than_free_returns_none_and_changes_nothing():
    pool = BlockPool(num_blocks=4, block_size=2)
    held = allocate(pool, 2)
    before = (pool.free_block_ids(), [b.ref_cnt for b in held], pool.blocks_allocated)
    assert pool.get_new_blocks(3) is None
    pool.check_invariants()
    assert (pool.free_block_ids(), [b.ref_cnt for b in held], pool.blocks_allocated) == before


def test_freed_blocks_join_the_tail_in_the_given_order():
    pool = BlockPool(num_blocks=4, block_size=2)
    blocks = allocate(pool, 3)
    pool.free_blocks(reversed(blocks))
    pool.check_invariants()
    assert pool.free_block_ids() == [3, 2, 1, 0]


def test_a_shared_block_is_freed_only_by_its_last_reference():
    pool = BlockPool(num_blocks=3, block_size=2)
    (block,) = allocate(pool, 1)
    pool.touch([block])
    pool.free_blocks([block])
    pool.check_invariants()
    assert block.ref_cnt == 1 and block.block_id not in pool.free_block_ids()
    pool.free_blocks([block])
    pool.check_invariants()
    assert pool.free_block_ids() == [1, 2, 0]


def test_touching_a_free_block_unlinks_it_from_the_middle():
    pool = BlockPool(num_blocks=4, block_size=2)
    pool.touch([pool.get_block(BlockId(2))])
    pool.check_invariants()
    assert pool.free_block_ids() == [0, 1, 3]
    assert pool.get_block(BlockId(2)).ref_cnt == 1


def test_double_free_raises():
    pool = BlockPool(num_blocks=2, block_size=2)
    (block,) = allocate(pool, 1)
    pool.free_blocks([block])
    with pytest.raises(ValueError, match="freed while free"):
        pool.free_blocks([block])
    pool.check_invariants()


def test_cached_block_is_found_while_used_and_while_free():
    pool = BlockPool(num_blocks=3, block_size=2)
    (block,) = allocate(pool, 1)
    key = key_for((1, 2))
    assert pool.cache_block(block, key)
    pool.check_invariants()
    assert pool.lookup(key) is block
    pool.free_blocks([block])
    pool.check_invariants()
    assert pool.lookup(key_for((1, 2))) is block
    assert pool.lookup(key_for((1, 3))) is None
    assert pool.cached_block_ids() == {0}


def test_reusing_a_cached_free_block_evicts_its_entry():
    pool = BlockPool(num_blocks=2, block_size=2)
    (block,) = allocate(pool, 1)
    pool.cache_block(block, key_for((1, 2)))
    pool.free_blocks([block])
    assert pool.free_block_ids() == [1, 0]
    allocate(pool, 2)  # takes block 1, then evicts block 0
    assert block.cache_key is None and block.block_hash is None
    assert pool.lookup(key_for((1, 2))) is None
    assert pool.blocks_evicted == 1 and pool.cached_block_ids() == set()


def test_cache_block_refuses_a_taken_hash():
    def colliding_hash(parent, token_ids, extra_keys):
        return 7

    pool = BlockPool(num_blocks=3, block_size=2)
    first, second = allocate(pool, 2)
    assert pool.cache_block(first, key_for((1, 2), hash_fn=colliding_hash))
    assert not pool.cache_block(second, key_for((3, 4), hash_fn=colliding_hash))
    pool.check_invariants()
    assert second.cache_key is None
    assert pool.lookup(key_for((3, 4), hash_fn=colliding_hash)) is None, "a collision returned other KV"
    assert pool.lookup(key_for((1, 2), hash_fn=colliding_hash)) is first


def test_cache_block_rejects_misuse():
    pool = BlockPool(num_blocks=2, block_size=2)
    with pytest.raises(ValueError, match="free block"):
        pool.cache_block(pool.get_block(BlockId(0)), key_for((1, 2)))
    (block,) = allocate(pool, 1)
    pool.cache_block(block, key_for((1, 2)))
    with pytest.raises(ValueError, match="already cached"):
        pool.cache_block(block, key_for((5, 6)))
    pool.check_invariants()


def test_reset_refuses_while_in_use_then_clears_every_entry():
    pool = BlockPool(num_blocks=2, block_size=2)
    (block,) = allocate(pool, 1)
    pool.cache_block(block, key_for((1, 2)))
    assert not pool.reset_prefix_cache()
    assert pool.cached_block_ids() == {0}
    pool.free_blocks([block])
    assert pool.reset_prefix_cache()
    pool.check_invariants()
    assert pool.cached_block_ids() == set() and block.cache_key is None
    assert pool.free_block_ids() == [1, 0], "a reset must not reorder the free queue"


def test_block_keys_compare_whole_prefixes_not_hashes():
    def ignore_tokens(parent, token_ids, extra_keys):
        return hash((parent, len(token_ids)))

    a = key_for((1, 1), (5, 5), hash_fn=ignore_tokens)
    b = key_for((2, 2), (5, 5), hash_fn=ignore_tokens)
    assert a.block_hash == b.block_hash and a.token_ids == b.token_ids
    assert not a.same_content(b), "equal hashes and tokens but different parents must differ"
    assert a.same_content(key_for((1, 1), (5, 5), hash_fn=ignore_tokens))
    assert not key_for((1, 1)).same_content(BlockKey.chain(None, (1, 1), ("salt",)))


def test_free_queue_rejects_double_insert_and_foreign_remove():
    queue = FreeBlockQueue()
    block = KVCacheBlock(BlockId(0))
    queue.append(block)
    with pytest.raises(ValueError, match="already in the free queue"):
        queue.append(block)
    queue.remove(block)
    with pytest.raises(ValueError, match="not in the free queue"):
        queue.remove(block)
    with pytest.raises(IndexError):
        queue.popleft()
    queue.check_invariants()


@st.composite
def queue_operations(draw):
    operation = st.tuples(st.sampled_from(["pop", "append", "remove"]), st.integers(0, 7))
    return draw(st.lists(operation, max_size=40))


@given(queue_operations())
def test_free_queue_matches_a_list(operations):
    """popleft / append / remove-from-middle keep the same order as a plain list."""
    blocks = [KVCacheBlock(BlockId(i)) for i in range(8)]
    queue, model = FreeBlockQueue(blocks[:4]), [0, 1, 2, 3]
    for operation, index in operations:
        if operation == "pop" and model:
            assert queue.popleft().block_id == model.pop(0)
        elif operation == "append" and index not in model:
            queue.append(blocks[index])
            model.append(index)
        elif operation == "remove" and index in model:
            queue.remove(blocks[index])
            model.remove(index)
        queue.check_invariants()
        assert [block.block_id for block in queue] == model and len(queue) == len(model)


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0)])
def test_pool_rejects_bad_sizes(num_blocks, block_size):
    with pytest.raises(ValueError, match="must be >= 1"):
        BlockPool(num_blocks, block_size)
