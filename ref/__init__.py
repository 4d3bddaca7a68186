"""ref: the reference engine, the oracle every optimization in `fast` is proved against.

Plain PyTorch, contiguous KV cache per sequence, naive static batching. Obviously right beats
fast here. The names below load on first use (`ref.lazy`): `ref.config` and friends import
without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ref.lazy import lazy_exports

_EXPORTS = {  # name -> the module that defines it
    "LLM": "ref.llm", "LLMEngine": "ref.engine", "EngineConfig": "ref.engine",
    "SamplingParams": "ref.sampling_params", "RequestOutput": "ref.outputs", "CompletionOutput": "ref.outputs",
    "Logprob": "ref.outputs",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from ref.engine import EngineConfig, LLMEngine
    from ref.llm import LLM
    from ref.outputs import CompletionOutput, Logprob, RequestOutput
    from ref.sampling_params import SamplingParams
