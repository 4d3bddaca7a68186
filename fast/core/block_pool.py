"""The block pool: every KV block of the cache, its free queue and its prefix-cache index.

KV memory is cut into `num_blocks` blocks of `block_size` token slots. A block is either *used*
(held by at least one block table, `ref_cnt > 0`) or *free* (`ref_cnt == 0`, in the free queue).
A free block may still carry the cache key of the KV it holds: it is then a prefix-cache entry
that a later request can revive, until the block is popped for reuse (evicted).

The free queue is in eviction order: `get_new_blocks` pops from the head, `free_blocks` appends at
the tail, and a cache hit on a free block removes it from the middle, all in O(1).

    head (evicted first)                                         tail (freed last)
      |                                                             |
      v                                                             v
    [b7] <-> [b3] <-> [b4] <-> ... <-> [b0]      touch(b3): unlink b3 in O(1)

Failure convention: allocating more blocks than are free returns None and changes nothing.
Misuse that signals a caller bug (freeing a free block, caching a block twice) raises at once.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NewType

BlockId = NewType("BlockId", int)
BlockHash = NewType("BlockHash", int)

# hash_fn(parent_hash, token_ids, extra_keys) -> hash of one full block; parent_hash is None for
# the first block of a sequence.
BlockHashFn = Callable[[BlockHash | None, tuple[int, ...], tuple[Hashable, ...]], int]


def default_block_hash(
    parent_hash: BlockHash | None, token_ids: tuple[int, ...], extra_keys: tuple[Hashable, ...]
) -> int:
    """Python's tuple hash of the chain link. Collisions are possible and harmless: a lookup
    compares the whole prefix (`BlockKey.same_content`), never the hash alone."""
    return hash((parent_hash, token_ids, extra_keys))


@dataclass(frozen=True, slots=True, eq=False)
class BlockKey:
    """Identity of the KV held by one full block: every token id up to the block's end, plus the
    extra keys (e.g. a cache salt) that must also match for a hit.

    The key links to its parent block's key, so two keys are `same_content` only if their whole
    prefixes are equal, not just their hashes: a collision, even in a parent's hash, can never
    make a lookup return a block computed from other tokens. Keys of a sequence share their parent
    objects, so a comparison usually stops at the first common ancestor after O(block_size) work.
    """

    block_hash: BlockHash
    token_ids: tuple[int, ...]
    extra_keys: tuple[Hashable, ...]
    parent: BlockKey | None

    @classmethod
    def chain(
        cls,
        parent: BlockKey | None,
        token_ids: Sequence[int],
        extra_keys: tuple[Hashable, ...],
        hash_fn: BlockHashFn = default_block_hash,
    ) -> BlockKey:
        """Key of the block holding `token_ids` right after the block keyed `parent`."""
        token_ids = tuple(token_ids)
        parent_hash = None if parent is None else parent.block_hash
        return cls(BlockHash(hash_fn(parent_hash, token_ids, extra_keys)), token_ids, extra_keys, parent)

    def same_content(self, other: BlockKey) -> bool:
        """True iff both keys name the same tokens from position 0 and the same extra keys."""
        mine: BlockKey | None = self
        theirs: BlockKey | None = other
        while mine is not theirs:
            if mine is None or theirs is None:
                return False
            if (mine.block_hash, mine.token_ids, mine.extra_keys) != (
                theirs.block_hash, theirs.token_ids, theirs.extra_keys
            ):
                return False
            mine, theirs = mine.parent, theirs.parent
        return True


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    """Metadata of one KV block; the KV itself lives in the model runner's cache tensors.

    Invariants (checked by `BlockPool.check_invariants`):
    - `ref_cnt` is the number of block tables holding the block; it is 0 iff the block is in the
      free queue.
    - `cache_key` is not None iff the pool's cache index maps `cache_key.block_hash` to this block.
    - `prev_free` / `next_free` are set iff the block is in the free queue (private to the queue).
    Blocks compare by identity (`eq=False`): two blocks are never interchangeable.
    """

    block_id: BlockId
    ref_cnt: int = 0
    cache_key: BlockKey | None = None
    prev_free: KVCacheBlock | None = field(default=None, repr=False)
    next_free: KVCacheBlock | None = field(default=None, repr=False)

    @property
    def block_hash(self) -> BlockHash | None:
        return None if self.cache_key is None else self.cache_key.block_hash


class FreeBlockQueue:
    """Doubly linked list of free blocks threaded through the blocks' own `prev_free`/`next_free`
    fields, between two sentinels: O(1) `popleft`, `append` and `remove` (from the middle).

    Invariants: the forward walk from the head sentinel reaches the tail sentinel after exactly
    `len(self)` blocks, each block once, and every block's `prev_free` is the block before it.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock] = ()) -> None:
        self._head = KVCacheBlock(BlockId(-1))
        self._tail = KVCacheBlock(BlockId(-1))
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[KVCacheBlock]:
        """Blocks in eviction order (head first)."""
        node = self._head.next_free
        while node is not self._tail:
            assert node is not None
            yield node
            node = node.next_free

    @staticmethod
    def is_queued(block: KVCacheBlock) -> bool:
        return block.prev_free is not None

    def popleft(self) -> KVCacheBlock:
        """Remove and return the head (the least recently freed block)."""
        if self._len == 0:
            raise IndexError("popleft from an empty free queue")
        block = self._head.next_free
        assert block is not None
        self.remove(block)
        return block

    def append(self, block: KVCacheBlock) -> None:
        """Put `block` at the tail (it becomes the last to be evicted)."""
        if self.is_queued(block):
            raise ValueError(f"block {block.block_id} is already in the free queue")
        last = self._tail.prev_free
        assert last is not None
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self._len += 1

    def remove(self, block: KVCacheBlock) -> None:
        """Unlink `block` from wherever it sits in the queue."""
        if not self.is_queued(block):
            raise ValueError(f"block {block.block_id} is not in the free queue")
        before, after = block.prev_free, block.next_free
        assert before is not None and after is not None
        before.next_free, after.prev_free = after, before
        block.prev_free = block.next_free = None
        self._len -= 1

    def check_invariants(self) -> None:
        seen: set[int] = set()
        node = self._head
        while node.next_free is not self._tail:
            nxt = node.next_free
            assert nxt is not None, "free queue broken: a link is missing"
            assert nxt.prev_free is node, f"free queue broken: block {nxt.block_id}'s back link"
            assert id(nxt) not in seen, f"block {nxt.block_id} appears twice in the free queue"
            seen.add(id(nxt))
            node = nxt
        assert self._tail.prev_free is node, "free queue broken: tail back link"
        assert len(seen) == self._len, f"free queue holds {len(seen)} blocks, counted {self._len}"


class BlockPool:
    """All `num_blocks` KV blocks, the free queue and the prefix-cache index (hash -> block).

    Invariants (`check_invariants`):
    - free + used = num_blocks; a block is free (in the queue, ref_cnt 0) or used (ref_cnt > 0),
      never both, and no block is twice in the queue.
    - every index entry `h -> b` has `b.cache_key.block_hash == h`, and every block with a
      cache key is the entry for its hash (at most one block per hash).
    - a failed `get_new_blocks` changes nothing.
    The pool counts references but does not know the tables: `KVCacheManager.check_invariants`
    checks that each ref_cnt equals the number of tables holding the block.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._blocks = [KVCacheBlock(BlockId(i)) for i in range(num_blocks)]
        self._free = FreeBlockQueue(self._blocks)
        self._cache_index: dict[BlockHash, KVCacheBlock] = {}
        self.blocks_allocated = 0  # blocks handed out fresh by get_new_blocks, ever
        self.blocks_evicted = 0  # cached blocks whose key was dropped on reuse, ever
        # Cache keys dropped, ever (evictions and resets): while it stays the same, every block
        # still carries the key it had, so an earlier lookup's hit is still cached.
        self.keys_dropped = 0

    # ---- observation -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cache_index)

    def get_block(self, block_id: BlockId) -> KVCacheBlock:
        return self._blocks[block_id]

    def free_block_ids(self) -> list[BlockId]:
        """Free blocks in eviction order: the first is the next one `get_new_blocks` takes."""
        return [block.block_id for block in self._free]

    def cached_block_ids(self) -> set[BlockId]:
        """Blocks, free or used, that carry a cache key."""
        return {block.block_id for block in self._cache_index.values()}

    # ---- allocation --------------------------------------------------------------------------

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock] | None:
        """Pop `num_blocks` blocks from the queue head with ref_cnt 1, evicting any cache entry
        they carry; None, with no side effect, if fewer are free."""
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if num_blocks > len(self._free):
            return None
        blocks = [self._free.popleft() for _ in range(num_blocks)]
        for block in blocks:
            assert block.ref_cnt == 0, f"free block {block.block_id} has ref_cnt {block.ref_cnt}"
            self._evict(block)
            block.ref_cnt = 1
        self.blocks_allocated += num_blocks
        return blocks

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Add one reference to each block, taking it out of the free queue if it was free."""
        for block in blocks:
            if block.ref_cnt == 0:
                self._free.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks_in_eviction_order: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block; blocks reaching 0 join the queue tail in the
        order given (so the first given is evicted first)."""
        for block in blocks_in_eviction_order:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed while free (ref_cnt {block.ref_cnt})")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free.append(block)

    # ---- prefix cache ------------------------------------------------------------------------

    def lookup(self, key: BlockKey) -> KVCacheBlock | None:
        """The cached block whose content equals `key` (free or used), else None."""
        block = self._cache_index.get(key.block_hash)
        if block is None:
            return None
        assert block.cache_key is not None
        return block if block.cache_key.same_content(key) else None

    def cache_block(self, block: KVCacheBlock, key: BlockKey) -> bool:
        """Register a used, full, uncached block under `key`. Returns False (and changes nothing)
        if the hash is already taken: a duplicate of `key`, or a collision."""
        if block.ref_cnt <= 0:
            raise ValueError(f"cannot cache free block {block.block_id}")
        if block.cache_key is not None:
            raise ValueError(f"block {block.block_id} is already cached")
        if key.block_hash in self._cache_index:
            return False
        block.cache_key = key
        self._cache_index[key.block_hash] = block
        return True

    def reset_prefix_cache(self) -> bool:
        """Drop every cache entry; refuses (returns False, changes nothing) while any block is used."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self._cache_index.values():
            block.cache_key = None
        self.keys_dropped += len(self._cache_index)
        self._cache_index.clear()
        return True

    def _evict(self, block: KVCacheBlock) -> None:
        if block.cache_key is None:
            return
        del self._cache_index[block.cache_key.block_hash]
        block.cache_key = None
        self.blocks_evicted += 1
        self.keys_dropped += 1

    # ---- invariants --------------------------------------------------------------------------

    def check_invariants(self) -> None:
        self._free.check_invariants()
        queued = {block.block_id for block in self._free}
        used = {block.block_id for block in self._blocks if block.ref_cnt > 0}
        assert not queued & used, f"blocks both free and used: {sorted(queued & used)}"
        assert len(queued) + len(used) == self.num_blocks, (
            f"free {len(queued)} + used {len(used)} != num_blocks {self.num_blocks}"
        )
        for block in self._blocks:
            assert block.ref_cnt >= 0, f"block {block.block_id} has ref_cnt {block.ref_cnt}"
            if block.cache_key is not None:
                entry = self._cache_index.get(block.cache_key.block_hash)
                assert entry is block, f"block {block.block_id} has a key but is not indexed"
        for block_hash, block in self._cache_index.items():
            assert block.block_hash == block_hash, (
                f"index entry {block_hash} -> block {block.block_id} carrying {block.block_hash}"
            )
            assert len(block.cache_key.token_ids) == self.block_size, (  # type: ignore[union-attr]
                f"cached block {block.block_id} is not full"
            )
