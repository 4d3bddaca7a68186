"""Stateful conformance check for paged KV allocators with prefix caching.

`AllocatorMachine` is a Hypothesis `RuleBasedStateMachine` that sends every operation both to the
allocator under test and to `AllocatorModel`, a trivially correct model (plain lists, and cached
content compared as whole token prefixes), then checks after each rule that the two agree on the
free-queue order, every block table, the cached blocks, the prefix hits and the counters, and that
the allocator's own `check_invariants()` holds. Prompt tokens are bits, prompts often extend
earlier prompts, and pools are small, so shared prefixes, evictions and failed allocations are
frequent.

Plug in another allocator with `make_allocator_machine(config, factory)`: `factory(config)` must
return an object with `KVCacheManager`'s public API (SPEC.md, "KV cache"), including the block
choice rules (allocation pops the free-queue head, free appends last block first), because the
model predicts exact block ids.

Adversity: with `weak_block_hash` (3 buckets, blind to extra keys) most blocks collide, so a
lookup that trusts hashes, compares only a block's own tokens, or ignores the cache salt returns
another prefix's KV, and the model (which compares whole prefixes and salts) disagrees. The
model counts what happened (hits on shared and on free cached blocks, collisions rejected by
kind, evictions) into an `AllocatorCoverage`. `machines_then_coverage` runs the tier: scripted
scenarios that produce every required event on purpose (`SCENARIOS`), then the random machines,
then fails the check naming any required event that never happened.
"""

from __future__ import annotations

import itertools
import zlib
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from hypothesis import currently_in_test_context, note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conformance.coverage import RequiredCoverage
from fast.core.kv_cache_manager import KVCacheConfig, KVCacheManager

# Token ids are bits: two letters make equal blocks (and so cache hits) common. A token list is
# drawn as one integer, not token by token, which keeps draws (and shrinking) cheap.
SALTS = (None, "salt-a")
REUSE = st.integers(0, 3)  # > 0: build on an earlier prompt (3 times in 4)


def draw_tokens(data: st.DataObject, length: int, label: str) -> list[int]:
    bits = data.draw(st.integers(0, 2**length - 1), label=label)
    return [(bits >> i) & 1 for i in range(length)]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def extra_keys(salt: str | None) -> tuple[Hashable, ...]:
    return () if salt is None else (salt,)


WEAK_HASH_BUCKETS = 3


def weak_block_hash(parent_hash: int | None, token_ids: tuple[int, ...], extra_keys: tuple[Hashable, ...]) -> int:
    """A `hash_fn` for adversity: WEAK_HASH_BUCKETS values, and blind to the extra keys (salt), so
    most distinct blocks collide and salted twins always do. Deterministic across processes."""
    return zlib.crc32(repr((parent_hash, token_ids)).encode()) % WEAK_HASH_BUCKETS


# Events of a run (counted by the model, so they are what the allocator had to get right).
HIT = "prefix hit"
HIT_SHARED = "hit on a block another request holds (ref_cnt > 1 after)"
HIT_FREE = "hit revives a free cached block"
COLLISION_TOKENS = "lookup rejected a hash collision: other tokens in the block"
COLLISION_PREFIX = "lookup rejected a hash collision: same block tokens, other earlier tokens"
COLLISION_SALT = "lookup rejected a hash collision: same tokens, other extra keys"
COLLISION_UNCACHED = "computed block left uncached: its hash holds other content"
EVICTED = "cached block evicted"
REFUSED = "allocation refused: too few free blocks"
CACHING_EVENTS = (HIT, EVICTED)  # required with prefix caching
# and with the weak hash: hits of both kinds, and every kind of collision
WEAK_HASH_EVENTS = (HIT_SHARED, HIT_FREE, COLLISION_TOKENS, COLLISION_PREFIX, COLLISION_SALT, COLLISION_UNCACHED)


class AllocatorCoverage(RequiredCoverage):
    """How often each machine's runs produced each event, against the events it must produce."""

    NEVER = "allocator events never produced"

    def summary(self) -> str:
        return "\n".join(f"{m}: " + ", ".join(f"{e} x{n}" for e, n in sorted(c.items()) if n)
                         for m, c in sorted(self.reached.items()))


def required_events(config: KVCacheConfig) -> tuple[str, ...]:
    if not config.enable_prefix_caching:
        return ()
    return CACHING_EVENTS + (WEAK_HASH_EVENTS if config.hash_fn is weak_block_hash else ())


@dataclass
class MachinesThenCoverage:
    """The allocator tier's run, as the machine classes a runner iterates over: iterating runs
    each machine's scripted scenarios (`run_scenarios`), yields each machine class for Hypothesis
    to run, then checks the coverage minimum over all of them. `coverage` stays readable after."""

    machines: list[type[AllocatorMachine]]
    coverage: AllocatorCoverage

    def __iter__(self) -> Iterator[type[AllocatorMachine]]:
        for machine in self.machines:
            run_scenarios(machine)
        yield from self.machines
        self.coverage.check_minimum()


def machines_then_coverage(machines: Iterable[type[AllocatorMachine]], coverage: AllocatorCoverage) -> MachinesThenCoverage:
    return MachinesThenCoverage(list(machines), coverage)


@dataclass
class ModelRequest:
    tokens: list[int]  # every token known so far (prompt, then sampled ones)
    salt: str | None
    table: list[int]
    num_tokens: int  # token slots the table covers
    num_computed: int = 0  # tokens whose KV is written
    num_keyed: int = 0  # leading full blocks already offered to the cache


@dataclass(frozen=True)
class CachedContent:
    prefix: tuple[int, ...]  # all token ids from position 0 to the block's end
    salt: str | None
    block_hash: int


@dataclass
class AllocatorModel:
    """The allocator's contract, written as plainly as possible (O(n) everywhere)."""

    config: KVCacheConfig
    free: list[int] = field(default_factory=list)  # eviction order, head first
    ref: list[int] = field(default_factory=list)
    cached: dict[int, CachedContent] = field(default_factory=dict)  # block id -> its KV's identity
    requests: dict[str, ModelRequest] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    events: Counter = field(default_factory=Counter)  # what happened (see AllocatorCoverage)

    def __post_init__(self) -> None:
        self.free = list(range(self.config.num_blocks))
        self.ref = [0] * self.config.num_blocks
        self.counters = dict.fromkeys(
            ("lookups", "queries", "hits", "blocks_evicted", "blocks_reused", "blocks_allocated"), 0
        )

    @property
    def bs(self) -> int:
        return self.config.block_size

    def block_hashes(self, tokens: list[int], salt: str | None, num_blocks: int) -> list[int]:
        """The chain of SPEC: h_i = hash_fn(h_{i-1}, tokens of block i, extra keys), h_-1 = None."""
        hashes: list[int] = []
        for i in range(num_blocks):
            parent = hashes[-1] if hashes else None
            block_tokens = tuple(tokens[i * self.bs:(i + 1) * self.bs])
            hashes.append(self.config.hash_fn(parent, block_tokens, extra_keys(salt)))
        return hashes

    def lookup(self, tokens: list[int], salt: str | None) -> list[int]:
        """Cached blocks holding the prompt's leading full blocks, leaving >= 1 token to compute."""
        if not self.config.enable_prefix_caching:
            return []
        hit: list[int] = []
        for i, block_hash in enumerate(self.block_hashes(tokens, salt, (len(tokens) - 1) // self.bs)):
            owner = [b for b, c in self.cached.items() if c.block_hash == block_hash]
            wanted = CachedContent(tuple(tokens[:(i + 1) * self.bs]), salt, block_hash)
            if not owner or self.cached[owner[0]] != wanted:
                if owner:
                    self.events[self.collision_kind(self.cached[owner[0]], wanted)] += 1
                break
            hit.append(owner[0])
        if hit:
            self.events[HIT] += 1
        self.counters["lookups"] += 1
        self.counters["queries"] += len(tokens)
        self.counters["hits"] += len(hit) * self.bs
        return hit

    def collision_kind(self, cached: CachedContent, wanted: CachedContent) -> str:
        if cached.prefix == wanted.prefix:
            return COLLISION_SALT
        return COLLISION_PREFIX if cached.prefix[-self.bs:] == wanted.prefix[-self.bs:] else COLLISION_TOKENS

    def pop_fresh(self, num_blocks: int) -> list[int]:
        taken = self.free[:num_blocks]
        del self.free[:num_blocks]
        for block in taken:
            if self.cached.pop(block, None) is not None:
                self.counters["blocks_evicted"] += 1
                self.events[EVICTED] += 1
            self.ref[block] = 1
        self.counters["blocks_allocated"] += num_blocks
        return taken

    def take(self, blocks: list[int]) -> None:
        for block in blocks:
            if self.ref[block] == 0:
                self.free.remove(block)
            self.ref[block] += 1

    def add(self, request_id: str, prompt: list[int], salt: str | None, hit: list[int], num_new: int) -> bool:
        num_tokens = len(hit) * self.bs + num_new
        num_fresh = cdiv(num_tokens, self.bs) - len(hit)
        if num_fresh > len(self.free) - sum(self.ref[b] == 0 for b in hit):
            self.events[REFUSED] += 1
            return False
        revived = sum(self.ref[b] == 0 for b in hit)
        self.take(hit)
        shared = sum(self.ref[b] > 1 for b in hit)
        self.events.update({HIT_FREE: revived, HIT_SHARED: shared} if hit else {})
        self.counters["blocks_reused"] += len(hit)
        table = hit + self.pop_fresh(num_fresh)
        self.requests[request_id] = ModelRequest(
            list(prompt), salt, table, num_tokens, num_computed=len(hit) * self.bs, num_keyed=len(hit)
        )
        return True

    def grow(self, request_id: str, num_new: int) -> bool:
        req = self.requests[request_id]
        num_fresh = cdiv(req.num_tokens + num_new, self.bs) - len(req.table)
        if num_fresh > len(self.free):
            self.events[REFUSED] += 1
            return False
        req.table += self.pop_fresh(num_fresh)
        req.num_tokens += num_new
        return True

    def compute(self, request_id: str) -> None:
        """All scheduled tokens are computed; full blocks join the cache unless taken."""
        req = self.requests[request_id]
        req.num_computed = req.num_tokens
        num_full = req.num_computed // self.bs
        if not self.config.enable_prefix_caching:
            return
        hashes = self.block_hashes(req.tokens, req.salt, num_full)
        for i in range(req.num_keyed, num_full):
            block = req.table[i]
            content = CachedContent(tuple(req.tokens[:(i + 1) * self.bs]), req.salt, hashes[i])
            taken_by = [c for c in self.cached.values() if c.block_hash == hashes[i]]
            if block not in self.cached and not taken_by:
                self.cached[block] = content
            elif taken_by and taken_by[0] != content and self.cached.get(block) != content:
                self.events[COLLISION_UNCACHED] += 1
        req.num_keyed = num_full

    def fork(self, parent_id: str, child_id: str) -> list[tuple[int, int]] | None:
        parent = self.requests[parent_id]
        num_full = parent.num_tokens // self.bs
        needs_copy = num_full < len(parent.table)
        if needs_copy and not self.free:
            return None
        copies = self.pop_fresh(1 if needs_copy else 0)
        self.take(parent.table[:num_full])
        self.requests[child_id] = ModelRequest(
            list(parent.tokens), parent.salt, parent.table[:num_full] + copies,
            parent.num_tokens, parent.num_computed, parent.num_keyed,
        )
        return [(parent.table[-1], dst) for dst in copies]

    def release(self, request_id: str) -> None:
        for block in reversed(self.requests.pop(request_id).table):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free.append(block)

    def reset(self) -> bool:
        if any(self.ref):
            return False
        self.cached.clear()
        return True


class AllocatorMachine(RuleBasedStateMachine):
    """Random interleavings of add / schedule / compute / fork / finish / abort / free_all /
    reset / probe, each checked against `AllocatorModel`.

    Configure by subclassing through `make_allocator_machine`; the defaults are a tiny pool.
    """

    config: KVCacheConfig = KVCacheConfig(num_blocks=6, block_size=2)
    factory: Callable[[KVCacheConfig], Any] = KVCacheManager
    coverage: AllocatorCoverage | None = None  # where each run's events are recorded

    def __init__(self) -> None:
        super().__init__()
        self.kv = self.factory(self.config)
        self.model = AllocatorModel(self.config)
        self.prompts_seen: list[list[int]] = []  # prompts of added requests, to build on
        self.next_request = 0
        self.cached_in_use: dict[int, set[str]] = {}  # at the last check: cached block -> requests holding it
        self.trace: list[str] = []  # the steps of a scripted scenario

    def teardown(self) -> None:
        if self.coverage is not None:
            self.coverage.record(type(self).__name__, self.model.events)

    def log(self, message: str) -> None:
        """Note a step: in the Hypothesis trace when under Hypothesis, else in `self.trace`."""
        if currently_in_test_context():
            note(message)
        else:
            self.trace.append(message)

    def check_all_invariants(self) -> None:
        """Every @invariant, as Hypothesis runs them after each rule (for scripted scenarios)."""
        for name in sorted(dir(type(self))):
            method = getattr(type(self), name)
            if getattr(method, "hypothesis_stateful_invariant", None) is not None:
                method(self)

    # ---- strategies and helpers --------------------------------------------------------------

    @property
    def bs(self) -> int:
        return self.config.block_size

    def draw_prompt(self, data: st.DataObject) -> list[int]:
        """A fresh prompt, or often an added prompt's prefix (shrinking to all of it) plus a tail."""
        max_len = 2 * self.bs + 2
        base: list[int] = []
        if self.prompts_seen and data.draw(REUSE, label="reuse") > 0:
            seen = self.prompts_seen[data.draw(st.integers(0, len(self.prompts_seen) - 1), label="seen")]
            base = seen[:len(seen) - data.draw(st.integers(0, len(seen)), label="cut back")]
        tail_len = data.draw(st.integers(0 if base else 1, max_len - len(base)), label="tail length")
        return base + draw_tokens(data, tail_len, label="tail")

    def new_request_id(self) -> str:
        self.next_request += 1
        return f"r{self.next_request}"

    def idle_ids(self) -> list[str]:
        return sorted(rid for rid, req in self.model.requests.items() if req.num_computed == req.num_tokens)

    def busy_ids(self) -> list[str]:
        return sorted(rid for rid, req in self.model.requests.items() if req.num_computed < req.num_tokens)

    def snapshot(self) -> tuple:
        tables = {r: (self.kv.get_block_table(r), self.kv.get_num_tokens(r)) for r in self.model.requests}
        return self.kv.free_block_ids(), tables, self.kv.cached_block_ids(), self.kv.stats, self.kv.usage

    def check_lookup(self, prompt: list[int], salt: str | None) -> Any:
        hit = self.kv.get_computed_blocks(prompt, salt)
        expected = self.model.lookup(prompt, salt)
        actual = [block.block_id for block in hit.blocks]
        self.log(f"lookup {prompt} salt={salt!r}: hit blocks {actual}, {hit.num_computed_tokens} tokens")
        assert actual == expected, f"hit blocks {actual}, model expects {expected}"
        assert hit.num_computed_tokens == len(expected) * self.bs
        assert hit.num_computed_tokens < len(prompt), "a hit must leave the last prompt token to compute"
        return hit

    # ---- rules -------------------------------------------------------------------------------

    @rule(data=st.data())
    def add_request(self, data: st.DataObject) -> None:
        """Look up a new prompt's cached prefix, then allocate it whole or a first chunk."""
        prompt = self.draw_prompt(data)
        salt = data.draw(st.sampled_from(SALTS), label="salt")
        hit = self.check_lookup(prompt, salt)
        num_new = data.draw(st.integers(1, len(prompt) - hit.num_computed_tokens), label="chunk")
        request_id = self.allocate_new(prompt, salt, hit, num_new)
        if request_id is not None and data.draw(st.booleans(), label="compute now"):
            self.run_forward(request_id)

    def allocate_new(self, prompt: list[int], salt: str | None, hit: Any, num_new: int) -> str | None:
        """Allocate a looked-up prompt's next `num_new` tokens as a new request: its id, or None
        when there is no room (as the model predicts)."""
        request_id = self.new_request_id()
        before = self.snapshot()
        ok = self.kv.allocate_slots(request_id, num_new, hit)
        expected = self.model.add(request_id, prompt, salt, [b.block_id for b in hit.blocks], num_new)
        self.log(f"add {request_id} ({num_new} new tokens): {'ok' if ok else 'no room'}")
        assert ok == expected, f"allocate_slots returned {ok}, model expects {expected}"
        if not ok:
            assert self.snapshot() == before, "a failed allocation changed the allocator"
            assert not self.kv.has_request(request_id)
            return None
        self.prompts_seen.append(prompt)
        return request_id

    def add_computed(self, prompt: list[int], salt: str | None) -> str | None:
        """Scripted add: look the prompt up, allocate the rest of it and compute it."""
        hit = self.check_lookup(prompt, salt)
        request_id = self.allocate_new(prompt, salt, hit, len(prompt) - hit.num_computed_tokens)
        if request_id is not None:
            self.run_forward(request_id)
        return request_id

    @precondition(lambda self: self.idle_ids())
    @rule(data=st.data())
    def schedule(self, data: st.DataObject) -> None:
        """Allocate the next prefill chunk or decode tokens (appending sampled tokens) of an idle request."""
        request_id = data.draw(st.sampled_from(self.idle_ids()), label="request")
        req = self.model.requests[request_id]
        num_new = data.draw(st.integers(1, 2 * self.bs), label="num_new")
        missing = req.num_tokens + num_new - len(req.tokens)
        if missing > 0:
            req.tokens += draw_tokens(data, missing, label="sampled tokens")
        before = self.snapshot()
        ok = self.kv.allocate_slots(request_id, num_new)
        expected = self.model.grow(request_id, num_new)
        self.log(f"schedule {request_id} +{num_new}: {'ok' if ok else 'no room'}")
        assert ok == expected, f"allocate_slots returned {ok}, model expects {expected}"
        if not ok:
            assert self.snapshot() == before, "a failed allocation changed the allocator"
        elif data.draw(st.booleans(), label="compute now"):
            self.run_forward(request_id)

    @precondition(lambda self: self.busy_ids())
    @rule(data=st.data())
    def compute(self, data: st.DataObject) -> None:
        """Run a busy request's forward: its scheduled tokens become computed and full blocks cached."""
        self.run_forward(data.draw(st.sampled_from(self.busy_ids()), label="request"))

    def run_forward(self, request_id: str) -> None:
        req = self.model.requests[request_id]
        slots = self.kv.slot_mapping(request_id, req.num_computed, req.num_tokens)
        positions = range(req.num_computed, req.num_tokens)
        expected_slots = [req.table[p // self.bs] * self.bs + p % self.bs for p in positions]
        assert slots == expected_slots, f"slot_mapping {slots}, model expects {expected_slots}"
        self.model.compute(request_id)
        self.kv.cache_full_blocks(request_id, req.tokens, req.num_computed)
        self.log(f"compute {request_id} up to {req.num_computed} tokens")

    @precondition(lambda self: self.idle_ids())
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        """Fork an idle request into a child sharing its full blocks (n > 1 sampling)."""
        parent_id = data.draw(st.sampled_from(self.idle_ids()), label="parent")
        child_id = self.new_request_id()
        before = self.snapshot()
        copies = self.kv.fork(parent_id, child_id)
        expected = self.model.fork(parent_id, child_id)
        self.log(f"fork {parent_id} -> {child_id}: copies {copies}")
        actual = None if copies is None else [tuple(copy) for copy in copies]
        assert actual == expected, f"fork returned {actual}, model expects {expected}"
        if copies is None:
            assert self.snapshot() == before, "a failed fork changed the allocator"

    @precondition(lambda self: self.idle_ids())
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        """Free an idle (finished) request."""
        request_id = data.draw(st.sampled_from(self.idle_ids()), label="request")
        self.release(request_id)

    @precondition(lambda self: self.model.requests)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        """Free any request, even one with scheduled but uncomputed tokens."""
        request_id = data.draw(st.sampled_from(sorted(self.model.requests)), label="request")
        self.release(request_id)

    @precondition(lambda self: self.model.requests)
    @rule()
    def free_all(self) -> None:
        """Free every request, as at the end of a run: every block becomes free with ref_cnt 0."""
        for request_id in sorted(self.model.requests):
            self.release(request_id)
        self.kv.check_invariants()
        still_used = set(range(self.config.num_blocks)) - set(self.kv.free_block_ids())
        assert not still_used, f"blocks {sorted(still_used)} still used after every request was freed"
        assert self.kv.usage == 0.0

    @precondition(lambda self: self.model.cached)  # resetting an empty cache teaches nothing
    @rule()
    def reset_prefix_cache(self) -> None:
        """Reset the prefix cache; refused while any block is in use."""
        ok = self.kv.reset_prefix_cache()
        expected = self.model.reset()
        self.log(f"reset_prefix_cache: {ok}")
        assert ok == expected, f"reset_prefix_cache returned {ok}, model expects {expected}"

    @rule(data=st.data())
    def probe(self, data: st.DataObject) -> None:
        """Look a prompt up without allocating: the hit is as modelled and nothing else changes."""
        self.probe_prompt(self.draw_prompt(data), data.draw(st.sampled_from(SALTS), label="salt"))

    def probe_prompt(self, prompt: list[int], salt: str | None) -> None:
        before = self.snapshot()[:3]  # the lookup counters may change, nothing else
        self.check_lookup(prompt, salt)
        assert self.snapshot()[:3] == before, "a lookup changed the allocator"

    def release(self, request_id: str) -> None:
        self.log(f"free {request_id}")
        self.kv.free(request_id)
        self.model.release(request_id)
        assert not self.kv.has_request(request_id)

    # ---- invariants --------------------------------------------------------------------------

    @invariant()
    def allocator_invariants_hold(self) -> None:
        self.kv.check_invariants()

    @invariant()
    def cached_blocks_in_use_are_never_evicted(self) -> None:
        """A cached block that requests hold keeps its cache entry while any of them holds it:
        only a free block (ref_cnt 0) may be evicted, never a shared one."""
        cached = self.kv.cached_block_ids()
        holders: dict[int, set[str]] = {}
        for request_id in self.model.requests:
            for block in self.kv.get_block_table(request_id):
                holders.setdefault(block, set()).add(request_id)
        for block, before in self.cached_in_use.items():
            still = before & holders.get(block, set())
            assert not still or block in cached, (
                f"block {block} lost its cache entry (evicted) while {sorted(still)} held it "
                f"(ref_cnt {len(holders[block])})"
            )
        self.cached_in_use = {block: ids for block, ids in holders.items() if block in cached}

    @invariant()
    def free_queue_matches_model(self) -> None:
        actual = self.kv.free_block_ids()
        assert actual == self.model.free, f"free queue {actual}, model expects {self.model.free}"
        assert self.kv.num_free_blocks == len(self.model.free)
        assert self.kv.usage == 1.0 - len(self.model.free) / self.config.num_blocks

    @invariant()
    def tables_match_model(self) -> None:
        for request_id, req in self.model.requests.items():
            table = self.kv.get_block_table(request_id)
            assert table == req.table, f"{request_id}: table {table}, model expects {req.table}"
            assert self.kv.get_num_tokens(request_id) == req.num_tokens
            assert len(table) == cdiv(req.num_tokens, self.bs)

    @invariant()
    def cached_blocks_match_model(self) -> None:
        actual = self.kv.cached_block_ids()
        expected = set(self.model.cached)
        assert actual == expected, f"cached {sorted(actual)}, model expects {sorted(expected)}"

    @invariant()
    def shared_blocks_hold_equal_prefixes(self) -> None:
        """Requests share block i only if their first (i+1)*block_size tokens and salts match."""
        owners: dict[int, tuple[int, tuple[int, ...], str | None]] = {}
        for request_id, req in self.model.requests.items():
            for i, block in enumerate(self.kv.get_block_table(request_id)):
                content = (i, tuple(req.tokens[:(i + 1) * self.bs]), req.salt)
                assert owners.setdefault(block, content) == content, (
                    f"block {block} shared by requests with different prefixes: {owners[block]} vs {content}"
                )

    @invariant()
    def stats_match_model(self) -> None:
        stats = self.kv.stats
        actual = {name: getattr(stats, name) for name in self.model.counters}
        assert actual == self.model.counters, f"stats {actual}, model expects {self.model.counters}"

def make_allocator_machine(
    config: KVCacheConfig,
    factory: Callable[[KVCacheConfig], Any] = KVCacheManager,
    name: str = "AllocatorMachine",
    coverage: AllocatorCoverage | None = None,
) -> type[AllocatorMachine]:
    """An `AllocatorMachine` subclass for one pool shape and allocator; use its `.TestCase`.
    With `coverage`, its runs' events are recorded there, and the events `config` requires
    (see `required_events`) are registered under `name`."""
    if coverage is not None:
        coverage.required[name] = required_events(config)
    return type(name, (AllocatorMachine,), {"config": config, "factory": staticmethod(factory), "coverage": coverage})


# ----------------------------------------------------------------------------- scripted scenarios
# Each reaches some required events on purpose, so the coverage minimum does not hang on luck.
# `step(method, *args)` calls a machine method, then checks every invariant.


def hits_and_evictions(step: Callable[..., Any], config: KVCacheConfig) -> None:
    """A computed prompt is hit while its request holds it (shared) and, while both hold it,
    another prompt caches more blocks (the shared ones must keep their entries); once all are
    freed the prompt is hit again (revived); then a prompt needing every block evicts them all."""
    bs = config.block_size
    prompt = [1] * (2 * bs + 1)
    first = step("add_computed", prompt, None)
    second = step("add_computed", prompt, None)
    third = step("add_computed", [2] * (2 * bs), None)
    for request_id in (first, second, third):
        step("release", request_id)
    step("release", step("add_computed", prompt, None))
    step("add_computed", [0] * (config.num_blocks * bs), None)


def _small_blocks(config: KVCacheConfig) -> list[tuple[int, ...]]:
    return list(itertools.product(range(3), repeat=config.block_size))


def colliding_blocks(step: Callable[..., Any], config: KVCacheConfig) -> None:
    """Two blocks of other tokens under one hash (if the hash has such a pair): the second is
    rejected at lookup, and stays uncached once computed; a salted lookup of the first is
    rejected too when the hash ignores the salt."""
    h = config.hash_fn
    blocks = _small_blocks(config)
    pair = next(((u, v) for u in blocks for v in blocks if u != v and h(None, u, ()) == h(None, v, ())), None)
    if pair is None:
        return
    u, v = pair
    first = step("add_computed", [*u, 0], None)
    step("probe_prompt", [*v, 0], None)
    step("probe_prompt", [*u, 0], SALTS[1])
    step("add_computed", [*v, 0], None)
    step("release", first)


def same_tokens_other_prefix(step: Callable[..., Any], config: KVCacheConfig) -> None:
    """A block cached behind another one, and a prompt starting with the same tokens, under one
    hash (if the hash has such a pair): the lookup must compare the whole prefix and reject it."""
    h = config.hash_fn
    blocks = _small_blocks(config)
    pair = next(((q, x) for q in blocks for x in blocks
                 if h(h(None, q, ()), x, ()) == h(None, x, ()) != h(None, q, ())), None)
    if pair is None:
        return
    q, x = pair
    step("add_computed", [*q, *x, 0], None)
    step("probe_prompt", [*x, 0], None)


SCENARIOS = (hits_and_evictions, colliding_blocks, same_tokens_other_prefix)


def run_scenarios(machine_class: type[AllocatorMachine]) -> None:
    """Each scenario on a fresh machine of `machine_class` (with prefix caching: the scenarios are
    about it); raises naming the scenario and its steps."""
    if not machine_class.config.enable_prefix_caching:
        return
    for scenario in SCENARIOS:
        machine = machine_class()

        def step(method: str, *args: Any) -> Any:
            result = getattr(machine, method)(*args)
            machine.check_all_invariants()
            return result

        try:
            machine.check_all_invariants()
            scenario(step, machine.config)
        except Exception as err:  # noqa: BLE001 - any failure is reported with the scenario's steps
            raise AssertionError(
                f"allocator scenario {scenario.__name__!r} on {machine_class.__name__} failed: "
                f"{type(err).__name__}: {err}\n  steps: {'; '.join(machine.trace)}") from err
        finally:
            machine.teardown()
