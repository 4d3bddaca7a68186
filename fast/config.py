"""The config layer.

`EngineConfig` holds every option of `fast.LLM` / `fast.LLMEngine` / `python -m fast.serve` as the
user gave it, validated at construction (an unknown option is an error). `EngineConfig.resolve()`
reads the checkpoint's config and turns it into the typed configs each layer takes:

    ResolvedConfig
      ├─ model:     ModelConfig      checkpoint, dtype, max_model_len, the decoder's hyperparameters
      ├─ cache:     CacheConfig      block_size, num_blocks (per rank), prefix caching
      ├─ scheduler: SchedulerConfig  max_num_seqs, token budget, chunking, policy
      └─ parallel:  ParallelConfig   tensor_parallel_size, executor backend

This module imports no torch until `resolve()` is called (so `--help` stays fast).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from fast.core.policy import BUILTIN_POLICIES, SchedulingPolicy, resolve_policy
from ref.config import config_from_options
from ref.inputs import DEFAULT_MAX_N
from ref.sampling_params import MAX_SEED

DEFAULT_KV_CACHE_MEMORY = 512 * 2**20  # bytes, when neither num_kv_blocks nor kv_cache_memory is set
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
POLICIES = BUILTIN_POLICIES  # the names `policy` takes as a string; or a SchedulingPolicy object
EXECUTOR_BACKENDS = ("uni", "mp", "ray")

if TYPE_CHECKING:
    from ref.config import ModelConfig as DecoderConfig


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0  # 0: a chunk is capped by the budget only
    policy: str | SchedulingPolicy = "fcfs"  # a name of POLICIES or a policy object (fast/core/policy.py)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}): every running request needs at least one token per step"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) when chunked prefill is off: a whole prompt must fit one step"
            )
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}")
        resolve_policy(self.policy)  # a built-in name or a SchedulingPolicy, else ValueError


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # None: "uni" for one rank, else "mp"

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        backend = self.distributed_executor_backend
        if backend is not None and backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be None or one of {EXECUTOR_BACKENDS}, "
                             f"got {backend!r}")
        if backend == "uni" and self.tensor_parallel_size > 1:
            raise ValueError(f"distributed_executor_backend='uni' runs one rank; tensor_parallel_size="
                             f"{self.tensor_parallel_size} needs 'mp' or 'ray'")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size

    @property
    def executor_backend(self) -> str:
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "uni" if self.world_size == 1 else "mp"


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    num_blocks: int  # per rank: every rank holds the same block ids for its KV heads
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.num_blocks < 1:
            raise ValueError(f"block_size and num_blocks must be >= 1, got {self.block_size}, {self.num_blocks}")


@dataclass(frozen=True)
class ModelConfig:
    path: str
    dtype: str  # resolved: "float32", "float16" or "bfloat16"
    max_model_len: int
    hf: "DecoderConfig"  # the checkpoint's decoder hyperparameters (`ref.config.ModelConfig`)

    def num_kv_heads_per_rank(self, parallel: ParallelConfig) -> int:
        """KV heads split across ranks; replicated (one per rank) when ranks outnumber them."""
        return max(1, self.hf.num_key_value_heads // parallel.tensor_parallel_size)

    def kv_bytes_per_block(self, block_size: int, parallel: ParallelConfig) -> int:
        """Bytes of K and V of all layers for one block, on one rank."""
        itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[self.dtype]
        per_token = 2 * self.hf.num_hidden_layers * self.num_kv_heads_per_rank(parallel) * self.hf.head_dim
        return per_token * block_size * itemsize


@dataclass(frozen=True)
class ResolvedConfig:
    """Everything the engine, the executor and the workers are built from."""

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig | None  # None in a worker process (`for_workers`)
    parallel: ParallelConfig
    device: str
    attention_backend: str
    seed: int

    def for_workers(self) -> "ResolvedConfig":
        """What the executors send each worker process: all but the scheduler's config. Workers
        never schedule, and that config may hold a user's `SchedulingPolicy` object, which need
        not pickle (a class defined inside a function, say) and must not need to."""
        return replace(self, scheduler=None)


@dataclass(frozen=True)
class EngineConfig:
    model: str
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    block_size: int = 16
    num_kv_blocks: int | None = None  # fixes the pool size; else sized from kv_cache_memory
    kv_cache_memory: int | None = None  # bytes for K/V of all layers
    max_num_seqs: int = 128
    max_num_batched_tokens: int | None = None  # None: max(2048, max_num_seqs[, max_model_len])
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0
    policy: str | SchedulingPolicy = "fcfs"  # "fcfs", "priority" or a SchedulingPolicy object
    attention_backend: str = "auto"
    device: str = "auto"  # "auto": cuda when available, else cpu
    max_logprobs: int = 20
    max_n: int = DEFAULT_MAX_N  # samples per request (SamplingParams.n)
    skip_tokenizer_init: bool = False
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # None: "uni" for 1 rank, "mp" for more
    # Step trace (fast/trace): False = off (costs nothing); True = records kept in memory
    # (`LLMEngine.tracer.records`); a path = also written there as JSON lines (SPEC "Step trace").
    trace: bool | str = False

    def __post_init__(self) -> None:
        if not isinstance(self.trace, (bool, str)) or self.trace == "":
            raise ValueError(f"trace must be False, True or a file path, got {self.trace!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be None or >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be None or >= 1 byte, got {self.kv_cache_memory}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be None or >= 1, got {self.max_model_len}")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be >= 0, got {self.max_logprobs}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {self.max_n}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, {MAX_SEED}], got {self.seed}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        resolve_policy(self.policy)  # a built-in name or a SchedulingPolicy, else ValueError
        self.parallel_config()  # validates tensor_parallel_size and the executor backend

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(self.tensor_parallel_size, self.distributed_executor_backend)

    def resolve(self) -> ResolvedConfig:
        """Read the checkpoint's config and size the KV cache and the token budget."""
        from ref.config import ModelConfig as DecoderConfig
        from ref.model import resolve_dtype

        hf = DecoderConfig.from_pretrained(self.model)
        max_model_len = self.max_model_len or hf.max_position_embeddings
        if max_model_len > hf.max_position_embeddings:
            raise ValueError(f"max_model_len must be <= max_position_embeddings "
                             f"({hf.max_position_embeddings}), got {max_model_len}")
        dtype = str(resolve_dtype(self.dtype, hf)).removeprefix("torch.")
        model = ModelConfig(self.model, dtype, max_model_len, hf)
        parallel = self.parallel_config()
        return ResolvedConfig(
            model=model,
            cache=CacheConfig(self.block_size, self._num_blocks(model, parallel), self.enable_prefix_caching),
            scheduler=self._scheduler_config(max_model_len),
            parallel=parallel,
            device=self.device,
            attention_backend=self.attention_backend,
            seed=self.seed,
        )

    def _num_blocks(self, model: ModelConfig, parallel: ParallelConfig) -> int:
        """KV blocks per rank: kv_cache_memory is each rank's budget (KV heads are split)."""
        per_block = model.kv_bytes_per_block(self.block_size, parallel)
        needed = cdiv(model.max_model_len, self.block_size)
        if self.num_kv_blocks is not None:
            num_blocks = self.num_kv_blocks
        elif self.kv_cache_memory is not None:
            num_blocks = self.kv_cache_memory // per_block
        else:  # the default budget, but never more than max_num_seqs full-length requests need
            num_blocks = min(DEFAULT_KV_CACHE_MEMORY // per_block, self.max_num_seqs * needed)
        if num_blocks < needed:
            raise ValueError(
                f"KV cache too small: {num_blocks} blocks of {self.block_size} tokens cannot hold one "
                f"request of max_model_len={model.max_model_len}; need num_kv_blocks >= {needed} "
                f"(kv_cache_memory >= {needed * per_block} bytes) or a smaller max_model_len"
            )
        return num_blocks

    def _scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        budget = self.max_num_batched_tokens
        if budget is None:
            budget = max(DEFAULT_MAX_NUM_BATCHED_TOKENS, self.max_num_seqs)
            if not self.enable_chunked_prefill:
                budget = max(budget, max_model_len)
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
            enable_chunked_prefill=self.enable_chunked_prefill,
            long_prefill_token_threshold=self.long_prefill_token_threshold, policy=self.policy,
        )

    @classmethod
    def from_options(cls, model: str, options: dict) -> "EngineConfig":
        return config_from_options(cls, model, options)
