"""fast: the paged, continuously batched engine. Same API as `ref`, proved equal by `conformance`.

The names below load on first use (`ref.lazy`), so that importing a light submodule
(`fast.config`, or `fast.entrypoints.openai_server` for `--help`) does not import torch through `fast.engine.llm_engine`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ref.lazy import lazy_exports

_EXPORTS = {  # name -> the module that defines it
    "LLM": "fast.engine.llm", "LLMEngine": "fast.engine.llm_engine", "EngineConfig": "fast.config", "EngineMetrics": "fast.engine.llm_engine",
    "SamplingParams": "ref.sampling_params", "RequestOutput": "ref.outputs", "CompletionOutput": "ref.outputs",
    "Logprob": "ref.outputs",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from fast.config import EngineConfig
    from fast.engine.llm_engine import EngineMetrics, LLMEngine
    from fast.engine.llm import LLM
    from ref.outputs import CompletionOutput, Logprob, RequestOutput
    from ref.sampling_params import SamplingParams
