"""The config layer: EngineConfig (every option, validated) resolved into the typed per-layer
configs; bad values are ValueErrors naming the option, before any worker starts."""

from __future__ import annotations

import pytest

from fast.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig


def test_resolve_gives_each_layer_its_typed_config(tiny_model_dir):
    cfg = EngineConfig(model=tiny_model_dir, max_model_len=64, block_size=8, max_num_seqs=4,
                       enable_chunked_prefill=False, policy="priority")
    resolved = cfg.resolve()
    assert resolved.model.max_model_len == 64 and resolved.model.dtype in ("float32", "float16", "bfloat16")
    assert isinstance(resolved.cache, CacheConfig) and resolved.cache.block_size == 8
    # the default pool: what max_num_seqs full-length requests need (4 x 64 / 8), within 512 MiB
    assert resolved.cache.num_blocks == 4 * 64 // 8
    sched = resolved.scheduler
    assert isinstance(sched, SchedulerConfig) and sched.policy == "priority"
    assert sched.max_num_batched_tokens >= 64, "without chunked prefill a whole prompt fits one step"
    assert resolved.parallel == ParallelConfig(1, None) and resolved.parallel.executor_backend == "uni"


def test_kv_cache_memory_is_per_rank_and_kv_heads_are_split(tiny_model_dir):
    one = EngineConfig(model=tiny_model_dir, max_model_len=64, kv_cache_memory=2**20).resolve()
    hf = one.model.hf
    two = EngineConfig(model=tiny_model_dir, max_model_len=64, kv_cache_memory=2**20, tensor_parallel_size=2).resolve()
    split = hf.num_key_value_heads // 2 >= 1
    # the same bytes per rank hold twice the blocks when each rank holds half the KV heads
    assert two.cache.num_blocks == (2 * one.cache.num_blocks if split else one.cache.num_blocks)
    assert two.parallel.executor_backend == "mp"


@pytest.mark.parametrize("options, field", [
    (dict(tensor_parallel_size=0), "tensor_parallel_size"),
    (dict(distributed_executor_backend="threads"), "distributed_executor_backend"),
    (dict(tensor_parallel_size=2, distributed_executor_backend="uni"), "distributed_executor_backend"),
    (dict(policy="lifo"), "policy"),
    (dict(block_size=0), "block_size"),
])
def test_bad_options_name_the_field(tiny_model_dir, options, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(model=tiny_model_dir, **options)


def test_unknown_option_is_an_error(tiny_model_dir):
    with pytest.raises(ValueError, match="tensor_paralel_size"):
        EngineConfig.from_options(tiny_model_dir, {"tensor_paralel_size": 2})


def test_an_unsplittable_model_fails_before_any_worker_starts(tiny_model_dir):
    """The tiny model's heads do not divide by 3: a ValueError from the engine, no process."""
    import multiprocessing

    from fast import LLM

    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="divisible"):
        LLM(tiny_model_dir, max_model_len=64, tensor_parallel_size=3)
    assert set(multiprocessing.active_children()) == before


def test_too_small_a_pool_names_what_is_needed(tiny_model_dir):
    with pytest.raises(ValueError, match="num_kv_blocks >= 8"):
        EngineConfig(model=tiny_model_dir, max_model_len=64, block_size=8, num_kv_blocks=7).resolve()
