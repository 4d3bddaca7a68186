"""The reference engine: contiguous KV per sequence, naive static batching.

`step()` either starts a new static batch (take whole requests from the waiting queue up to
`max_batch` sequences, right-pad their prompts, prefill them together) or runs one decode step
of the current batch. The batch runs until every member is done; only then is the next one
formed. Each sequence reserves KV for prompt + max_tokens (capped at max_model_len) up front:
`get_metrics()` reports that reservation against what is actually used.

Token controls are applied plainly, per sequence and step (SPEC §6 step 1): a request's
bad_words are tokenized and its constraint compiled once, at `add_request`; each sample asks its
own grammar for the allowed tokens before sampling and feeds it the token after.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from ref.config import config_from_options
from ref.inputs import (
    DEFAULT_MAX_N, ProcessedPrompt, RequestLimits, bad_words_token_ids, check_request_id, process_prompt,
    request_ids_to_abort, truncate_prompt, validate_request,
)
from ref.model import KVCache, load_model
from ref.outputs import PromptLogprobs, RequestOutput
from ref.sampler import TokenControls, logprob_entry, sample
from ref.sampling_params import MAX_SEED, SamplingParams, StructuredOutputsParams
from ref.sequence import Sequence, StopContext, draw_base_seed, make_sequences
from ref.structured import TokenGrammar, compile_constraint, grammar_vocabulary
from ref.tokenizer import TextCodec, load_tokenizer


@dataclass(frozen=True)
class EngineConfig:
    """Options of `ref.LLM` / `ref.LLMEngine`; validated at construction."""

    model: str
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    max_batch: int = 16  # sequences per static batch
    max_logprobs: int = 20
    max_n: int = DEFAULT_MAX_N  # samples per request (SamplingParams.n)
    skip_tokenizer_init: bool = False

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be None or >= 1, got {self.max_model_len}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be >= 0, got {self.max_logprobs}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {self.max_n}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, {MAX_SEED}], got {self.seed}")

    @classmethod
    def from_options(cls, model: str, options: dict) -> "EngineConfig":
        return config_from_options(cls, model, options)


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request, ready to queue: what `LLMEngine.process` computes without touching
    engine state (so a batch can be checked in full before any of it is queued)."""

    prompt: ProcessedPrompt  # truncated to truncate_prompt_tokens
    params: SamplingParams  # the engine's own re-validated copy
    bad_words_ids: list[list[int]] = field(default_factory=list)
    grammar: Any = None  # the compiled constraint (xgrammar CompiledGrammar), None if unconstrained


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    prompt_logprobs: PromptLogprobs | None = None
    bad_words_ids: list[list[int]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def to_output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            prompt_logprobs=self.prompt_logprobs,
            outputs=[s.to_output() for s in self.seqs],
            finished=self.finished,
        )


@dataclass
class StaticBatch:
    """Rows of (request, sequence) sharing one padded contiguous KV cache."""

    rows: list[tuple[Request, Sequence]]
    cache: KVCache

    @property
    def done(self) -> bool:
        return all(seq.finished for _, seq in self.rows)


@dataclass
class RefMetrics:
    num_waiting: int = 0
    num_running: int = 0
    kv_slots_reserved_peak: int = 0  # slots held by the largest batch
    kv_slot_steps_reserved: int = 0  # sum over steps of reserved slots
    kv_slot_steps_used: int = 0  # sum over steps of slots holding a live token
    max_concurrent_seqs: int = 0

    @property
    def kv_utilization(self) -> float:
        return self.kv_slot_steps_used / self.kv_slot_steps_reserved if self.kv_slot_steps_reserved else 0.0


class LLMEngine:
    """add_request / step / abort_request over static batches. Not thread-safe."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.model = load_model(config.model, config.dtype)
        self.model_config = self.model.config
        tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config.model)
        self.codec = TextCodec(tokenizer)
        max_len = config.max_model_len or self.model_config.max_position_embeddings
        if max_len > self.model_config.max_position_embeddings:
            raise ValueError(
                f"max_model_len must be <= max_position_embeddings "
                f"({self.model_config.max_position_embeddings}), got {max_len}"
            )
        self.max_model_len = max_len
        self.limits = RequestLimits(self.model_config.vocab_size, max_len, config.max_logprobs, config.max_n)
        self.stop_ctx = StopContext(self.model_config.eos_token_ids, max_len, self.codec)
        self._seed_gen = torch.Generator().manual_seed(config.seed)
        self.waiting: deque[Request] = deque()
        self.requests: dict[str, Request] = {}
        self.batch: StaticBatch | None = None
        self.metrics = RefMetrics()
        self._grammar_compiler = None  # built on the first constrained request (xgrammar loads slowly)

    # ------------------------------------------------------------------ requests
    def process(self, prompt, params: SamplingParams | None) -> PreparedRequest:
        """Validate a prompt and its params without touching engine state (SPEC §4): the prompt
        truncated to truncate_prompt_tokens, the engine's own copy of the params, the bad words'
        token sequences and the compiled constraint. Raises ValueError naming the field."""
        params = SamplingParams() if params is None else params
        if isinstance(params, SamplingParams):
            params = params.clone()  # re-validated: the caller may have changed fields since
        processed = truncate_prompt(process_prompt(prompt, self.codec), params)
        validate_request(processed, params, self.limits, self.codec.has_tokenizer)
        if params.n > self.config.max_batch:
            raise ValueError(f"n must be <= max_batch ({self.config.max_batch}), got {params.n}")
        bad_words = bad_words_token_ids(self.codec, params.bad_words or [])
        so = params.structured_outputs
        grammar = None if so is None else self._compile(so)
        return PreparedRequest(processed, params, bad_words, grammar)

    def _compile(self, so: StructuredOutputsParams):
        """The constraint's compiled grammar, once per request (ValueError naming the field)."""
        if self._grammar_compiler is None:
            import xgrammar

            vocab = grammar_vocabulary(self.codec.tokenizer, self.model_config.vocab_size,
                                       self.model_config.eos_token_ids)
            self._grammar_compiler = xgrammar.GrammarCompiler(vocab)
        return compile_constraint(self._grammar_compiler, so)

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    priority: int = 0) -> None:
        """Queue a request; raises ValueError (changing nothing) when it is invalid.

        `priority` is accepted for API compatibility; the reference serves in arrival order.
        """
        self._check_new_id(request_id, priority)
        self.add_prepared(request_id, self.process(prompt, params), priority)

    def add_prepared(self, request_id: str, prepared: PreparedRequest, priority: int = 0) -> None:
        """Queue a request that `process` already validated (as `add_request` does)."""
        self._check_new_id(request_id, priority)
        params = prepared.params
        new_grammar = None
        if prepared.grammar is not None:
            new_grammar = partial(TokenGrammar, prepared.grammar, self.model_config.vocab_size)
        # Unseeded requests get a seed from the engine's generator, in arrival order.
        seqs = make_sequences(params, draw_base_seed(self._seed_gen), new_grammar)
        req = Request(request_id, prepared.prompt.prompt, prepared.prompt.prompt_token_ids, params, seqs,
                      bad_words_ids=prepared.bad_words_ids)
        self.requests[request_id] = req
        self.waiting.append(req)

    def _check_new_id(self, request_id: str, priority: int) -> None:
        check_request_id(request_id)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")

    def abort_request(self, request_id: str | list[str]) -> None:
        """Finish the request(s) with reason "abort"; unknown ids are ignored."""
        for rid in request_ids_to_abort(request_id):
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            for seq in req.seqs:
                if not seq.finished:
                    seq.finish("abort")
            if req in self.waiting:
                self.waiting.remove(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def get_metrics(self) -> RefMetrics:
        self.metrics.num_waiting = len(self.waiting)
        self.metrics.num_running = 0 if self.batch is None else len({id(r) for r, s in self.batch.rows if not s.finished})
        return self.metrics

    # ------------------------------------------------------------------ stepping
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One prefill of a new static batch, or one decode step of the current one."""
        if self.batch is None or self.batch.done:
            self.batch = self._form_batch()
            if self.batch is None:
                return []
            self._prefill(self.batch)
        else:
            self._decode(self.batch)
        self._account_kv(self.batch)
        return self._collect_outputs(self.batch)

    def _form_batch(self) -> StaticBatch | None:
        rows: list[tuple[Request, Sequence]] = []
        while self.waiting and len(rows) + self.waiting[0].params.n <= self.config.max_batch:
            req = self.waiting.popleft()
            rows += [(req, seq) for seq in req.seqs]
        if not rows:
            return None
        max_len = max(self._reservation(req) for req, _ in rows)
        cache = KVCache(self.model_config, len(rows), max_len, self.model.dtype)
        return StaticBatch(rows, cache)

    def _reservation(self, req: Request) -> int:
        """KV slots a sequence of `req` reserves: prompt + max_tokens, capped at max_model_len."""
        max_tokens = req.params.max_tokens or self.max_model_len
        return min(len(req.prompt_token_ids) + max_tokens, self.max_model_len)

    def _prefill(self, batch: StaticBatch) -> None:
        lens = [len(req.prompt_token_ids) for req, _ in batch.rows]
        T = max(lens)
        input_ids = torch.zeros(len(batch.rows), T, dtype=torch.long)  # right-padded
        for b, (req, _) in enumerate(batch.rows):
            input_ids[b, : lens[b]] = torch.tensor(req.prompt_token_ids)
        positions = torch.arange(T).expand(len(batch.rows), T)  # [B, T]
        hidden = self.model(input_ids, positions, batch.cache)  # [B, T, hidden]
        last = hidden[torch.arange(len(lens)), torch.tensor(lens) - 1]  # [B, hidden]
        logits = self.model.compute_logits(last)  # [B, V]
        for b, (req, seq) in enumerate(batch.rows):
            if req.params.prompt_logprobs is not None and req.prompt_logprobs is None:
                req.prompt_logprobs = self._prompt_logprobs(req, hidden[b, : lens[b] - 1])
            self._sample(req, seq, logits[b])

    def _decode(self, batch: StaticBatch) -> None:
        B = len(batch.rows)
        input_ids = torch.zeros(B, 1, dtype=torch.long)
        positions = torch.zeros(B, 1, dtype=torch.long)  # finished rows rewrite their slot 0
        for b, (req, seq) in enumerate(batch.rows):
            if not seq.finished:
                input_ids[b, 0] = seq.output_ids[-1]
                positions[b, 0] = len(req.prompt_token_ids) + len(seq.output_ids) - 1
        logits = self.model.compute_logits(self.model(input_ids, positions, batch.cache)[:, 0])
        for b, (req, seq) in enumerate(batch.rows):
            if not seq.finished:
                self._sample(req, seq, logits[b])

    def _sample(self, req: Request, seq: Sequence, logits: torch.Tensor) -> None:
        p = seq.params
        controls = TokenControls(seq.allowed_by_grammar(), req.bad_words_ids)
        token = sample(logits, p, req.prompt_token_ids, seq.output_ids,
                       self.model_config.eos_token_ids, seq.generator, controls)
        if token is None:  # the masks left no token (SPEC §5 rule 0)
            seq.finish_without_token()
            return
        if p.logprobs is not None:
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            seq.logprobs.append(logprob_entry(logprobs, token, p.logprobs, self.codec.token_text))
            seq.cumulative_logprob += float(logprobs[token])
        seq.append(token, len(req.prompt_token_ids), self.stop_ctx)

    def _prompt_logprobs(self, req: Request, hidden: torch.Tensor) -> PromptLogprobs:
        """Entry i+1 scores prompt token i+1 given tokens 0..i; entry 0 is None."""
        logprobs = torch.log_softmax(self.model.compute_logits(hidden), dim=-1)  # [L-1, V]
        k = req.params.prompt_logprobs
        out: PromptLogprobs = [None]
        for i, token in enumerate(req.prompt_token_ids[1:]):
            out.append(logprob_entry(logprobs[i], token, k, self.codec.token_text))
        return out

    def _account_kv(self, batch: StaticBatch) -> None:
        """Reserved: every row's full reservation. Used: K/V tokens of unfinished rows."""
        running = [(req, seq) for req, seq in batch.rows if not seq.finished]
        reserved = len(batch.rows) * batch.cache.max_len
        used = sum(len(req.prompt_token_ids) + len(seq.output_ids) - 1 for req, seq in running)
        m = self.metrics
        m.kv_slots_reserved_peak = max(m.kv_slots_reserved_peak, reserved)
        m.kv_slot_steps_reserved += reserved
        m.kv_slot_steps_used += used
        m.max_concurrent_seqs = max(m.max_concurrent_seqs, len(running))

    def _collect_outputs(self, batch: StaticBatch) -> list[RequestOutput]:
        """Cumulative outputs of the batch's live requests; finished ones are reported once."""
        outputs, seen = [], set()
        for req, _ in batch.rows:
            if req.request_id in seen or self.requests.get(req.request_id) is not req:
                continue
            seen.add(req.request_id)
            outputs.append(req.to_output())
            if req.finished:
                del self.requests[req.request_id]
        return outputs
