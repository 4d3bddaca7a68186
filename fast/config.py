"""`EngineConfig`: every option of `fast.LLM` / `fast.LLMEngine`, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass

from ref.config import config_from_options
from ref.inputs import DEFAULT_MAX_N
from ref.sampling_params import MAX_SEED

DEFAULT_KV_CACHE_MEMORY = 512 * 2**20  # bytes, when neither num_kv_blocks nor kv_cache_memory is set
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048


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
    policy: str = "fcfs"
    attention_backend: str = "auto"
    device: str = "auto"  # "auto": cuda when available, else cpu
    max_logprobs: int = 20
    max_n: int = DEFAULT_MAX_N  # samples per request (SamplingParams.n)
    skip_tokenizer_init: bool = False

    def __post_init__(self) -> None:
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

    @classmethod
    def from_options(cls, model: str, options: dict) -> "EngineConfig":
        return config_from_options(cls, model, options)
