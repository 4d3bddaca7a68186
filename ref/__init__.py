"""ref: the reference engine, the oracle every optimization in `fast` is proved against.

Plain PyTorch, contiguous KV cache per sequence, naive static batching. Obviously right beats
fast here.
"""

from ref.engine import EngineConfig, LLMEngine
from ref.llm import LLM
from ref.outputs import CompletionOutput, Logprob, RequestOutput
from ref.sampling_params import SamplingParams

__all__ = [
    "LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob",
]
