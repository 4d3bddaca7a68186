"""fast: the paged, continuously batched engine. Same API as `ref`, proved equal by `conformance`.

The names below load on first use (module `__getattr__`), so that importing a light submodule
(`fast.config`, or `fast.serve` for `--help`) does not import torch through `fast.engine`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {  # name -> the module that defines it
    "LLM": "fast.llm", "LLMEngine": "fast.engine", "EngineConfig": "fast.config", "EngineMetrics": "fast.engine",
    "SamplingParams": "ref.sampling_params", "RequestOutput": "ref.outputs", "CompletionOutput": "ref.outputs",
    "Logprob": "ref.outputs",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from fast.config import EngineConfig
    from fast.engine import EngineMetrics, LLMEngine
    from fast.llm import LLM
    from ref.outputs import CompletionOutput, Logprob, RequestOutput
    from ref.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fast' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
