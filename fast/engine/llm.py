"""`fast.LLM`: the offline entry point, the same `generate` and `chat` contracts as `ref.LLM`."""

from __future__ import annotations

from typing import Any

from fast.config import EngineConfig
from fast.engine.llm_engine import LLMEngine
from ref.chat import chat_prompts
from ref.inputs import normalize_batch
from ref.outputs import RequestOutput


class LLM:
    """The offline engine: `LLM(model, **options).generate(prompts, sampling_params)`, and
    `.chat(messages, sampling_params)` for conversations (SPEC §2).

    `model` is a local Hugging Face checkpoint directory (the embedded one:
    `str(ref.models.tiny_checkpoint())`, random weights, so its text is gibberish).
    Options (an unknown name is a ValueError listing these; each is validated):

        dtype="auto"                    "auto" (the checkpoint's), "float32", "float16", "bfloat16"
        seed=0                          seeds the per-request seeds of unseeded requests
        max_model_len=None              prompt + output limit; None: max_position_embeddings
        block_size=16                   tokens per KV block
        num_kv_blocks=None              KV pool size in blocks; None: from kv_cache_memory
        kv_cache_memory=None            bytes of K/V for all layers; None: 512 MiB, capped at
                                        max_num_seqs full-length requests
        max_num_seqs=128                samples running at once
        max_num_batched_tokens=None     tokens per step; None: max(2048, max_num_seqs)
                                        (and >= max_model_len without chunked prefill)
        enable_prefix_caching=True      reuse full KV blocks of identical prefixes
        enable_chunked_prefill=True     split long prompts across steps
        long_prefill_token_threshold=0  cap on one prompt chunk per step; 0: no cap
        policy="fcfs"                   "fcfs", "priority" (lower value served first) or a
                                        fast.core.policy.SchedulingPolicy object
        attention_backend="auto"        "auto", "torch" or "triton"
        device="auto"                   "auto" (cuda if available), "cpu", "cuda[:N]"
        max_logprobs=20                 largest logprobs / prompt_logprobs a request may ask
        max_n=128                       largest SamplingParams.n a request may ask
        skip_tokenizer_init=False       no tokenizer: token-id prompts only, empty text
        tensor_parallel_size=1          ranks the model is split across (column/row-parallel
                                        layers, KV heads split; one worker per rank)
        distributed_executor_backend=None  "uni" (in-process), "mp" (a process per rank,
                                        torch.distributed) or "ray"; None: uni for 1, mp for more
        trace=False                     True: record every step (llm_engine.tracer.records); a path:
                                        also as JSON lines there (SPEC §13, python -m fast.trace)
    """

    def __init__(self, model: str, **options: Any):
        self.llm_engine = LLMEngine(EngineConfig.from_options(model, options))
        self._next_id = 0

    def shutdown(self) -> None:
        """Stop the workers (with tensor_parallel_size > 1, their processes exit)."""
        self.llm_engine.shutdown()

    def get_tokenizer(self):
        return self.llm_engine.codec.tokenizer

    def generate(self, prompts: Any, sampling_params: Any = None, use_tqdm: bool = True,
                 priority: list[int] | None = None) -> list[RequestOutput]:
        """Outputs in input order. Every request is validated before any of them is queued."""
        engine = self.llm_engine
        batch = normalize_batch(prompts, sampling_params)
        if priority is not None and len(priority) != len(batch):
            raise ValueError(f"priority must have len(prompts)={len(batch)} entries, got {len(priority)}")
        processed = [engine.process(prompt, params) for prompt, params in batch]  # raises before queueing
        ids = []
        for i, (p, params) in enumerate(processed):
            rid = str(self._next_id)
            self._next_id += 1
            # Token ids, so the text is not tokenized a second time.
            engine.add_request(rid, {"prompt_token_ids": p.prompt_token_ids, "prompt": p.prompt}, params,
                               priority=priority[i] if priority else 0)
            ids.append(rid)
        finished: dict[str, RequestOutput] = {}
        bar = _progress(len(ids)) if use_tqdm else None
        while len(finished) < len(ids):
            for out in engine.step_finished():  # the running requests' outputs are not read
                if out.finished:
                    finished[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [finished[rid] for rid in ids]

    def chat(self, messages: Any, sampling_params: Any = None, chat_template: str | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per conversation (one, or a list of them), in order: each rendered
        by `ref.chat.chat_prompt`, then generated as by `generate`. Every conversation is
        rendered and every request validated before any is queued."""
        prompts = chat_prompts(messages, self.get_tokenizer(), chat_template, add_generation_prompt)
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
