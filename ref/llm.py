"""`ref.LLM`: the offline entry points, `generate(prompts, sampling_params)` and `chat(messages, ...)`."""

from __future__ import annotations

from typing import Any

from ref.chat import chat_prompts
from ref.engine import EngineConfig, LLMEngine
from ref.inputs import normalize_batch
from ref.outputs import RequestOutput


class LLM:
    """The oracle's offline engine: `LLM(model, **options).generate(prompts, sampling_params)`,
    and `.chat(messages, sampling_params)` for conversations (SPEC §2).

    `model` is a local Hugging Face checkpoint directory. Options (an unknown name is a
    ValueError listing these):

        dtype="auto"                "auto" (the checkpoint's), "float32", "float16", "bfloat16"
        seed=0                      seeds the per-request seeds of unseeded requests
        max_model_len=None          prompt + output limit; None: max_position_embeddings
        max_batch=16                sequences per static batch (and the largest n)
        max_logprobs=20             largest logprobs / prompt_logprobs a request may ask
        max_n=128                   largest SamplingParams.n a request may ask
        skip_tokenizer_init=False   no tokenizer: token-id prompts only, empty text
    """

    def __init__(self, model: str, **options: Any):
        self.llm_engine = LLMEngine(EngineConfig.from_options(model, options))
        self._next_id = 0

    def get_tokenizer(self):
        return self.llm_engine.codec.tokenizer

    def generate(self, prompts: Any, sampling_params: Any = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Outputs in input order. Every request is validated (its constraint compiled too)
        before any of them is queued."""
        engine = self.llm_engine
        batch = normalize_batch(prompts, sampling_params)
        prepared = [engine.process(prompt, params) for prompt, params in batch]  # raises before queueing
        ids = []
        for request in prepared:
            rid = str(self._next_id)
            self._next_id += 1
            engine.add_prepared(rid, request)
            ids.append(rid)
        finished: dict[str, RequestOutput] = {}
        while len(finished) < len(ids):
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
        return [finished[rid] for rid in ids]

    def chat(self, messages: Any, sampling_params: Any = None, chat_template: str | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = False) -> list[RequestOutput]:
        """One RequestOutput per conversation (one, or a list of them), in order: each rendered
        by `ref.chat.chat_prompt`, then generated as by `generate`. Every conversation is
        rendered and every request validated before any is queued."""
        prompts = chat_prompts(messages, self.get_tokenizer(), chat_template, add_generation_prompt)
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
