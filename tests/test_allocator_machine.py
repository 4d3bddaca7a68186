"""Runs the allocator state machine (conformance/allocator.py) over several pool shapes, with
prefix caching on and off and with a deliberately weak hash, and shows that it catches mutants.

A failing machine shrinks for one to a few minutes per configuration; select one with -k while
debugging.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from conformance.allocator import make_allocator_machine
from fast.core.kv_cache_manager import KVCacheConfig, KVCacheManager, RequestId

# One allocator bug trips several of the machine's checks; shrinking each as a distinct bug takes
# minutes, so report only the first.
STEPS = settings(stateful_step_count=100, report_multiple_bugs=False)


def weak_hash(parent, token_ids, extra_keys) -> int:
    """Three buckets: most cacheable blocks collide with another block's hash."""
    return hash((parent, token_ids, extra_keys)) % 3


CONFIGS = {
    "4x1": KVCacheConfig(num_blocks=4, block_size=1),
    "6x2": KVCacheConfig(num_blocks=6, block_size=2),
    "8x4": KVCacheConfig(num_blocks=8, block_size=4),
    "16x2": KVCacheConfig(num_blocks=16, block_size=2),
    "5x3-no-cache": KVCacheConfig(num_blocks=5, block_size=3, enable_prefix_caching=False),
    "6x2-weak-hash": KVCacheConfig(num_blocks=6, block_size=2, hash_fn=weak_hash),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_allocator_conforms_to_model(name):
    machine = make_allocator_machine(CONFIGS[name], name=f"Allocator_{name}")
    run_state_machine_as_test(machine, settings=settings(STEPS))


class ForwardFreeOrder(KVCacheManager):
    """Mutant: frees head block first, so a request's prefix blocks are evicted before its tail."""

    def free(self, request_id: RequestId) -> None:
        table = self._requests.pop(request_id).blocks  # reaching in is the point of a mutant
        self._pool.free_blocks(table)


class SaltBlindLookup(KVCacheManager):
    """Mutant: ignores the cache salt, so one tenant may read another's KV."""

    def get_computed_blocks(self, token_ids, cache_salt=None):
        return super().get_computed_blocks(token_ids, None)


@pytest.mark.parametrize("mutant", [ForwardFreeOrder, SaltBlindLookup])
def test_machine_catches_mutant(mutant):
    machine = make_allocator_machine(KVCacheConfig(num_blocks=8, block_size=2), factory=mutant)
    quick = settings(
        STEPS, phases=[Phase.generate], database=None,
        suppress_health_check=list(HealthCheck),
    )
    with pytest.raises(AssertionError):
        run_state_machine_as_test(machine, settings=quick)


def test_weak_block_hash_has_three_buckets_and_ignores_the_salt():
    from conformance.allocator import WEAK_HASH_BUCKETS, weak_block_hash

    values = {weak_block_hash(p, (a, b), ()) for p in (None, 0, 1, 2) for a in range(4) for b in range(4)}
    assert values == set(range(WEAK_HASH_BUCKETS))
    assert weak_block_hash(None, (1, 2), ("salt-a",)) == weak_block_hash(None, (1, 2), ())


def test_scenarios_alone_reach_every_required_event():
    """The scripted scenarios produce every event the coverage minimum asks of the tier's pools,
    whatever the random runs then do."""
    from conformance.allocator import AllocatorCoverage, run_scenarios, weak_block_hash

    coverage = AllocatorCoverage()
    configs = {"6x2": KVCacheConfig(num_blocks=6, block_size=2), "10x4": KVCacheConfig(num_blocks=10, block_size=4),
               "5x1-no-cache": KVCacheConfig(num_blocks=5, block_size=1, enable_prefix_caching=False),
               "6x2-weak": KVCacheConfig(num_blocks=6, block_size=2, hash_fn=weak_block_hash)}
    for name, config in configs.items():
        run_scenarios(make_allocator_machine(config, name=name, coverage=coverage))
    coverage.check_minimum()
    assert len(coverage.required["6x2-weak"]) == 8


def test_coverage_minimum_names_the_missing_events():
    from collections import Counter

    from conformance.allocator import COLLISION_SALT, HIT, AllocatorCoverage

    coverage = AllocatorCoverage(required={"m": (HIT, COLLISION_SALT)})
    coverage.record("m", Counter({HIT: 3}))
    with pytest.raises(AssertionError, match="coverage minimum.*m: lookup rejected a hash collision: same tokens, other extra keys"):
        coverage.check_minimum()
