"""`fast.LLM`: the offline entry point, the same `generate` contract as `ref.LLM`."""

from __future__ import annotations

from typing import Any

from fast.config import EngineConfig
from fast.engine import LLMEngine
from ref.inputs import normalize_batch
from ref.outputs import RequestOutput


class LLM:
    """LLM(model, dtype="auto", block_size=16, num_kv_blocks=None, kv_cache_memory=None,
    max_num_seqs=128, max_num_batched_tokens=None, enable_prefix_caching=True,
    enable_chunked_prefill=True, policy="fcfs", attention_backend="auto", ...)."""

    def __init__(self, model: str, **options: Any):
        self.llm_engine = LLMEngine(EngineConfig.from_options(model, options))
        self._next_id = 0

    def get_tokenizer(self):
        return self.llm_engine.codec.tokenizer

    def generate(self, prompts: Any, sampling_params: Any = None, use_tqdm: bool = True,
                 priority: list[int] | None = None) -> list[RequestOutput]:
        """Outputs in input order. Every request is validated before any of them is queued."""
        engine = self.llm_engine
        batch = normalize_batch(prompts, sampling_params)
        if priority is not None and len(priority) != len(batch):
            raise ValueError(f"priority must have len(prompts)={len(batch)} entries, got {len(priority)}")
        for prompt, params in batch:
            engine.process(prompt, params)
        ids = []
        for i, (prompt, params) in enumerate(batch):
            rid = str(self._next_id)
            self._next_id += 1
            engine.add_request(rid, prompt, params, priority=priority[i] if priority else 0)
            ids.append(rid)
        finished: dict[str, RequestOutput] = {}
        bar = _progress(len(ids)) if use_tqdm else None
        while len(finished) < len(ids):
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [finished[rid] for rid in ids]


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
