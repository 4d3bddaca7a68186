"""Per-request paged KV bookkeeping on top of `BlockPool`: block tables, slot mappings, growth,
fork for n > 1 samples, and automatic prefix caching.

The scheduler drives one request through these calls (SPEC.md, "KV cache"):

    hit = kv.get_computed_blocks(prompt_token_ids, cache_salt)     # lookup, no side effect
    n = len(prompt_token_ids) - hit.num_computed_tokens             # tokens to compute (>= 1)
    if not kv.allocate_slots(request_id, n, hit):                   # all or nothing
        ...  # too few free blocks: nothing changed; retry later or preempt someone
    slots = kv.slot_mapping(request_id, hit.num_computed_tokens, kv.get_num_tokens(request_id))
    ...  # the forward pass writes the KV of those tokens
    kv.cache_full_blocks(request_id, all_token_ids, num_computed_tokens)
    kv.allocate_slots(request_id, 1)                                # each decode step
    kv.fork(request_id, child_id)                                   # n > 1: returns block copies
    kv.free(request_id)                                             # finish, abort or preempt

Shared blocks are never written: a block is shared (by a prefix hit or a fork) only once it is
full, and a request only writes slots at positions >= its token count, which lie in its last,
unshared block or in fresh ones. `fork` therefore copies the parent's partly filled last block
into a fresh block for the child instead of sharing it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, NewType

from fast.config import cdiv
from fast.core.block_pool import (
    BlockHashFn,
    BlockId,
    BlockKey,
    BlockPool,
    KVCacheBlock,
    default_block_hash,
)

RequestId = NewType("RequestId", str)


@dataclass(frozen=True)
class KVCacheConfig:
    """Size of the paged KV cache and whether identical prefixes share blocks.

    `hash_fn` chains block hashes (see `BlockKey.chain`); tests inject a weak one to force
    collisions, which must never produce a wrong hit.
    """

    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    hash_fn: BlockHashFn = default_block_hash

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


@dataclass(frozen=True)
class PrefixHit:
    """Result of `get_computed_blocks`: the cached blocks that hold the KV of the prompt's first
    `num_computed_tokens` tokens (a multiple of block_size, at most len(prompt) - 1).

    Pass it to `allocate_slots` for the same request right away: another allocation in between
    may evict its blocks, and `allocate_slots` then raises instead of returning wrong KV.
    """

    blocks: tuple[KVCacheBlock, ...]
    keys: tuple[BlockKey, ...]
    num_computed_tokens: int
    extra_keys: tuple[Hashable, ...] = ()
    keys_dropped: int = -1  # the pool's count of dropped cache keys when the lookup was made

    @property
    def block_ids(self) -> list[BlockId]:
        return [block.block_id for block in self.blocks]


class BlockCopy(NamedTuple):
    """The runner must copy the KV of block `src` into block `dst` before the next forward."""

    src: BlockId
    dst: BlockId


@dataclass(frozen=True)
class PrefixCacheStats:
    """Counters since construction. `queries`/`hits` count prompt tokens looked up / found;
    lookups with caching disabled count nothing."""

    lookups: int
    queries: int
    hits: int
    blocks_evicted: int
    blocks_reused: int  # cached blocks taken by allocate_slots instead of fresh ones
    blocks_allocated: int  # fresh blocks taken from the free queue

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    @property
    def block_reuse_rate(self) -> float:
        """Fraction of the blocks placed in tables that came from the prefix cache."""
        placed = self.blocks_reused + self.blocks_allocated
        return self.blocks_reused / placed if placed else 0.0


@dataclass(slots=True)
class _RequestBlocks:
    """One request's block table. `block_keys[i]` is the key of the KV in `blocks[i]` for the
    leading full, computed blocks; `blocks[i]` itself carries that key only if it is the one
    indexed block with that content (a duplicate or a colliding block stays unkeyed)."""

    blocks: list[KVCacheBlock]
    num_tokens: int
    extra_keys: tuple[Hashable, ...]
    block_keys: list[BlockKey] = field(default_factory=list)


class KVCacheManager:
    """Block tables of all running requests over one `BlockPool`.

    Invariants (`check_invariants`, on top of the pool's):
    - len(block_table) == ceil(num_tokens / block_size) for every request.
    - a block's ref_cnt equals the number of block tables holding it (0 iff free).
    - a block held by several tables, or by one table and the cache, is full in every table
      holding it: shared blocks are never written.
    - the leading full blocks of a table carry, if any key, the key the request computed for them.
    - with prefix caching disabled no block ever carries a key.
    - a failed `allocate_slots` or `fork` changes no count, table or ref_cnt.
    - once every request is freed, every block is free with ref_cnt 0 (cache keys may remain).
    """

    def __init__(self, config: KVCacheConfig) -> None:
        self.config = config
        self.block_size = config.block_size
        self.enable_prefix_caching = config.enable_prefix_caching
        self._pool = BlockPool(config.num_blocks, config.block_size)
        self._requests: dict[RequestId, _RequestBlocks] = {}
        self._lookups = self._queries = self._hits = self._blocks_reused = 0

    # ---- observation -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self._pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one request."""
        return self._pool.usage

    @property
    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            lookups=self._lookups,
            queries=self._queries,
            hits=self._hits,
            blocks_evicted=self._pool.blocks_evicted,
            blocks_reused=self._blocks_reused,
            blocks_allocated=self._pool.blocks_allocated,
        )

    def has_request(self, request_id: RequestId) -> bool:
        return request_id in self._requests

    def request_ids(self) -> list[RequestId]:
        """Every request holding a block table, in the order their tables were made."""
        return list(self._requests)

    def get_block_table(self, request_id: RequestId, start: int = 0) -> list[BlockId]:
        """The request's block ids from index `start` on (a step sends only the new ones)."""
        return [block.block_id for block in self._request(request_id).blocks[start:]]

    def get_num_tokens(self, request_id: RequestId) -> int:
        """Token slots the request's table covers (computed plus scheduled tokens)."""
        return self._request(request_id).num_tokens

    def slot_mapping(self, request_id: RequestId, start: int, end: int) -> list[int]:
        """Cache slot of each token position in [start, end):

            position p -> block_table[p // block_size] * block_size + p % block_size
        """
        req = self._request(request_id)
        if not 0 <= start <= end <= req.num_tokens:
            raise ValueError(f"positions [{start}, {end}) outside [0, {req.num_tokens}) of {request_id!r}")
        bs = self.block_size
        return [req.blocks[p // bs].block_id * bs + p % bs for p in range(start, end)]

    def free_block_ids(self) -> list[BlockId]:
        """Free blocks in eviction order (next to be reused first)."""
        return self._pool.free_block_ids()

    def cached_block_ids(self) -> set[BlockId]:
        """Blocks, free or used, registered in the prefix cache."""
        return self._pool.cached_block_ids()

    # ---- prefix cache lookup -----------------------------------------------------------------

    def get_computed_blocks(self, token_ids: Sequence[int], cache_salt: str | None = None,
                            since: PrefixHit | None = None) -> PrefixHit:
        """Longest chain of cached full blocks equal to a prefix of `token_ids` (and salt).

        The hit stops before the block holding the last token, so at least one token is left to
        compute (it yields the logits):

            token_ids   |  block 0  |  block 1  |  block 2  | b3 |
            considered  |<------ (len - 1) // block_size blocks ------>|
            hit         | cached    | cached    | miss -> stop

        `since`: an earlier hit for a prefix of the same `token_ids` (a request still waiting
        for blocks is looked up at every step). Its blocks that still carry its keys are hit
        again without hashing their tokens; the walk resumes after them: the same result, in
        O(new blocks) when no key was dropped since, instead of O(prompt) hashes.

        No side effect except the lookup counters.
        """
        extra_keys = self._extra_keys(cache_salt)
        if not self.enable_prefix_caching:
            return PrefixHit((), (), 0, extra_keys)
        blocks: list[KVCacheBlock] = []
        keys: list[BlockKey] = []
        num_considered = (len(token_ids) - 1) // self.block_size
        if since is not None and since.extra_keys == extra_keys:
            num_kept = self._num_still_cached(since, num_considered)
            blocks, keys = list(since.blocks[:num_kept]), list(since.keys[:num_kept])
        for index in range(len(blocks), num_considered):
            key = self._block_key(keys[-1] if keys else None, token_ids, index, extra_keys)
            block = self._pool.lookup(key)
            if block is None:
                break
            assert block.cache_key is not None
            blocks.append(block)
            keys.append(block.cache_key)
        num_computed = len(blocks) * self.block_size
        self._lookups += 1
        self._queries += len(token_ids)
        self._hits += num_computed
        return PrefixHit(tuple(blocks), tuple(keys), num_computed, extra_keys, self._pool.keys_dropped)

    def _num_still_cached(self, hit: PrefixHit, limit: int) -> int:
        """How many leading blocks of an earlier hit (at most `limit`) still carry its keys: all
        of them if no key was dropped since (O(1)), else up to the first that lost its key. A key
        object is attached to one block once, ever, so `is` proves the cached content the same."""
        if hit.keys_dropped == self._pool.keys_dropped:
            return min(len(hit.blocks), limit)
        for index, (block, key) in enumerate(zip(hit.blocks[:limit], hit.keys)):
            if block.cache_key is not key:
                return index
        return min(len(hit.blocks), limit)

    # ---- allocation --------------------------------------------------------------------------

    def allocate_slots(
        self, request_id: RequestId, num_new_tokens: int, prefix_hit: PrefixHit | None = None
    ) -> bool:
        """Grow the request's table to cover `num_new_tokens` more tokens; all or nothing.

        First call for a request (it is added): the table becomes the hit's blocks plus fresh
        blocks, covering `prefix_hit.num_computed_tokens + num_new_tokens` tokens. Later calls
        (no hit allowed) extend it:

            |<- hit / earlier tokens ->|<---- num_new_tokens ---->|
            | b0 | b1 | b2 (partial)  ...   | new | new (partial) |
                                      ^ first new slot            ^ new num_tokens

        Returns False, with no side effect, if too few blocks are free; hit blocks sitting in
        the free queue count as taken, not as free.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        req = self._requests.get(request_id)
        if req is None:
            return self._allocate_new(request_id, num_new_tokens, prefix_hit)
        if prefix_hit is not None:
            raise ValueError(
                f"request {request_id!r} already has blocks; a prefix hit only applies to its first allocation"
            )
        return self._grow(req, num_new_tokens)

    def _allocate_new(self, request_id: RequestId, num_new_tokens: int, hit: PrefixHit | None) -> bool:
        hit = PrefixHit((), (), 0) if hit is None else hit
        self._check_hit_is_fresh(hit)
        num_tokens = hit.num_computed_tokens + num_new_tokens
        num_new_blocks = cdiv(num_tokens, self.block_size) - len(hit.blocks)
        num_hits_in_queue = sum(block.ref_cnt == 0 for block in hit.blocks)
        if num_new_blocks > self._pool.num_free_blocks - num_hits_in_queue:
            return False
        self._pool.touch(hit.blocks)  # before popping, so a free hit block cannot be evicted
        new_blocks = self._pool.get_new_blocks(num_new_blocks)
        assert new_blocks is not None
        self._blocks_reused += len(hit.blocks)
        self._requests[request_id] = _RequestBlocks(
            blocks=[*hit.blocks, *new_blocks],
            num_tokens=num_tokens,
            extra_keys=hit.extra_keys,
            block_keys=list(hit.keys),
        )
        return True

    def _check_hit_is_fresh(self, hit: PrefixHit) -> None:
        for block, key in zip(hit.blocks, hit.keys, strict=True):
            if block.cache_key is not key:
                raise ValueError(
                    f"stale prefix hit: block {block.block_id} was evicted after the lookup; "
                    "call allocate_slots right after get_computed_blocks"
                )

    def _grow(self, req: _RequestBlocks, num_new_tokens: int) -> bool:
        num_tokens = req.num_tokens + num_new_tokens
        new_blocks = self._pool.get_new_blocks(cdiv(num_tokens, self.block_size) - len(req.blocks))
        if new_blocks is None:
            return False
        req.blocks.extend(new_blocks)
        req.num_tokens = num_tokens
        return True

    # ---- caching computed blocks -------------------------------------------------------------

    def cache_full_blocks(
        self, request_id: RequestId, token_ids: Sequence[int], num_computed_tokens: int
    ) -> None:
        """Register the request's blocks that became full of computed KV.

        Call after the forward pass wrote the KV of the first `num_computed_tokens` tokens;
        `token_ids` is the request's whole sequence so far (at least that long, and the same
        tokens as in earlier calls). A block identical to one already cached stays unkeyed (the
        existing entry wins); so does a block whose hash collides with a different cached one.
        """
        req = self._request(request_id)
        if not num_computed_tokens <= min(req.num_tokens, len(token_ids)):
            raise ValueError(
                f"num_computed_tokens={num_computed_tokens} exceeds the {req.num_tokens} slots or "
                f"{len(token_ids)} token ids of {request_id!r}"
            )
        if not self.enable_prefix_caching:
            return
        for index in range(len(req.block_keys), num_computed_tokens // self.block_size):
            key = self._block_key(req.block_keys[-1] if req.block_keys else None, token_ids, index, req.extra_keys)
            req.block_keys.append(self._register(req.blocks[index], key))

    def _block_key(
        self, parent: BlockKey | None, token_ids: Sequence[int], index: int, extra_keys: tuple[Hashable, ...]
    ) -> BlockKey:
        """Key of block `index` of `token_ids`, chained to `parent` (the key of block index - 1)."""
        block_tokens = token_ids[index * self.block_size:(index + 1) * self.block_size]
        return BlockKey.chain(parent, block_tokens, extra_keys, self.config.hash_fn)

    def _register(self, block: KVCacheBlock, key: BlockKey) -> BlockKey:
        """Cache `block` under `key` unless that content (or hash) is taken; return the key
        object the request chains from (the existing one when equal, to share parents)."""
        if block.cache_key is not None:  # shared with a fork sibling that cached it first
            if not block.cache_key.same_content(key):
                raise ValueError(f"block {block.block_id} is cached with other tokens than given")
            return block.cache_key
        existing = self._pool.lookup(key)
        if existing is not None:
            assert existing.cache_key is not None
            return existing.cache_key
        self._pool.cache_block(block, key)
        return key

    # ---- fork and free -----------------------------------------------------------------------

    def fork(self, parent_id: RequestId, child_id: RequestId) -> list[BlockCopy] | None:
        """Add `child_id` with the parent's tokens, for n > 1 samples.

        The child shares the parent's full blocks (ref_cnt + 1); the parent's partly filled last
        block, if any, is copied into one fresh block: the returned `BlockCopy` tells the runner
        which KV to copy; the model runner copies it after the forward pass that writes the
        parent's KV (the scheduler forks at the end of the step in which the prompt completes).
        Returns the copies ([] when the parent's tokens fill whole blocks), or None, with no
        side effect, when no block is free for the copy.
        """
        parent = self._request(parent_id)
        if child_id in self._requests:
            raise ValueError(f"request {child_id!r} already exists")
        num_full = parent.num_tokens // self.block_size
        needs_copy = num_full < len(parent.blocks)
        copies = self._pool.get_new_blocks(1 if needs_copy else 0)
        if copies is None:
            return None
        shared = parent.blocks[:num_full]
        self._pool.touch(shared)
        self._requests[child_id] = _RequestBlocks(
            blocks=[*shared, *copies],
            num_tokens=parent.num_tokens,
            extra_keys=parent.extra_keys,
            block_keys=list(parent.block_keys),
        )
        return [BlockCopy(parent.blocks[-1].block_id, dst.block_id) for dst in copies]

    def free(self, request_id: RequestId) -> None:
        """Release the request's blocks (finish, abort or preemption), last block first, so its
        tail blocks are the first to be evicted. Cached blocks stay cached until evicted."""
        req = self._requests.pop(request_id, None)
        if req is None:
            raise KeyError(f"unknown request {request_id!r}")
        self._pool.free_blocks(reversed(req.blocks))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; refuses (False, no change) while any block is in use."""
        return self._pool.reset_prefix_cache()

    # ---- helpers and invariants --------------------------------------------------------------

    def _request(self, request_id: RequestId) -> _RequestBlocks:
        try:
            return self._requests[request_id]
        except KeyError:
            raise KeyError(f"unknown request {request_id!r}") from None

    @staticmethod
    def _extra_keys(cache_salt: str | None) -> tuple[Hashable, ...]:
        return () if cache_salt is None else (cache_salt,)

    def check_invariants(self) -> None:
        self._pool.check_invariants()
        holders: dict[BlockId, int] = {}
        for request_id, req in self._requests.items():
            self._check_request(request_id, req)
            for block in req.blocks:
                holders[block.block_id] = holders.get(block.block_id, 0) + 1
        for block_id in range(self._pool.num_blocks):
            block = self._pool.get_block(BlockId(block_id))
            num_holders = holders.get(block.block_id, 0)
            assert block.ref_cnt == num_holders, (
                f"block {block_id}: ref_cnt {block.ref_cnt} but held by {num_holders} tables"
            )
            assert self.enable_prefix_caching or block.cache_key is None, (
                f"block {block_id} is cached with prefix caching disabled"
            )

    def _check_request(self, request_id: RequestId, req: _RequestBlocks) -> None:
        bs = self.block_size
        assert len(req.blocks) == cdiv(req.num_tokens, bs), (
            f"{request_id!r}: {len(req.blocks)} blocks for {req.num_tokens} tokens (block_size {bs})"
        )
        assert len({id(block) for block in req.blocks}) == len(req.blocks), f"{request_id!r}: a block twice"
        assert len(req.block_keys) <= req.num_tokens // bs, f"{request_id!r}: a key for a non-full block"
        for index, block in enumerate(req.blocks):
            is_full = (index + 1) * bs <= req.num_tokens
            assert is_full or (block.ref_cnt == 1 and block.cache_key is None), (
                f"{request_id!r}: partly filled block {block.block_id} is shared or cached"
            )
        for index, key in enumerate(req.block_keys):
            carried = req.blocks[index].cache_key
            assert carried is None or (carried.block_hash, carried.token_ids) == (key.block_hash, key.token_ids), (
                f"{request_id!r}: block {req.blocks[index].block_id} carries another key than computed"
            )
            expected_parent = req.block_keys[index - 1].block_hash if index else None
            actual_parent = None if key.parent is None else key.parent.block_hash
            assert actual_parent == expected_parent, f"{request_id!r}: key chain broken at block {index}"
