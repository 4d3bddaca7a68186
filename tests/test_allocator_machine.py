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
from fast.kv_cache_manager import KVCacheConfig, KVCacheManager, RequestId

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
