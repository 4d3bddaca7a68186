"""fast: the paged, continuously batched engine. Same API as `ref`, proved equal by `conformance`."""

from fast.config import EngineConfig
from fast.engine import EngineMetrics, LLMEngine
from fast.llm import LLM
from ref.outputs import CompletionOutput, Logprob, RequestOutput
from ref.sampling_params import SamplingParams

__all__ = [
    "LLM", "LLMEngine", "EngineConfig", "EngineMetrics", "SamplingParams", "RequestOutput",
    "CompletionOutput", "Logprob",
]
