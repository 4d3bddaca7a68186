"""`fast.LLMEngine`: add_request / step / abort_request over the continuous-batching pipeline.

One step:  Scheduler.schedule -> ModelRunner.prepare/execute (paged attention) -> fork n > 1
samples off a finished prompt -> Sampler (one batched pass) -> append tokens, apply stop rules,
cache newly full blocks, free finished requests -> RequestOutputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fast.attention import get_backend
from fast.config import DEFAULT_KV_CACHE_MEMORY, DEFAULT_MAX_NUM_BATCHED_TOKENS, EngineConfig
from fast.core.kv_cache_manager import KVCacheConfig, KVCacheManager, cdiv
from fast.worker.model import PagedDecoder
from fast.worker.model_runner import ModelRunner, StepInputs, kv_bytes_per_block
from fast.core.request import Request, RequestGroup, SampleId, Status
from fast.worker.sampler import Sampler, SamplingRow, logprob_entry
from fast.core.scheduler import ScheduledRequest, Scheduler, SchedulerConfig
from ref.inputs import (
    ProcessedPrompt, RequestLimits, check_request_id, process_prompt, request_ids_to_abort, validate_request,
)
from ref.outputs import RequestOutput
from ref.sampling_params import SamplingParams
from ref.sequence import StopContext, draw_base_seed, make_sequences
from ref.tokenizer import TextCodec, load_tokenizer


MAX_LATENCY_RECORDS = 10_000


@dataclass
class EngineMetrics:
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks in use
    prefix_cache_hit_rate: float
    num_preemptions: int
    num_generated_tokens: int
    num_prompt_tokens_computed: int
    elapsed_s: float  # time spent inside step()
    ttft_s: dict[str, float] = field(default_factory=dict)  # per finished request (latest 10k)
    tpot_s: dict[str, float] = field(default_factory=dict)

    @property
    def generation_tokens_per_s(self) -> float:
        return self.num_generated_tokens / self.elapsed_s if self.elapsed_s else 0.0


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class LLMEngine:
    """Continuous batching over a paged KV cache. Not thread-safe."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = _resolve_device(config.device)
        self.model = PagedDecoder.from_pretrained(config.model, config.dtype).to(self.device)
        mcfg = self.model.config
        self.max_model_len = config.max_model_len or mcfg.max_position_embeddings
        if self.max_model_len > mcfg.max_position_embeddings:
            raise ValueError(f"max_model_len must be <= max_position_embeddings "
                             f"({mcfg.max_position_embeddings}), got {self.max_model_len}")
        self.codec = TextCodec(None if config.skip_tokenizer_init else load_tokenizer(config.model))
        self.limits = RequestLimits(mcfg.vocab_size, self.max_model_len, config.max_logprobs, config.max_n)
        self.stop_ctx = StopContext(mcfg.eos_token_ids, self.max_model_len, self.codec)
        self.num_blocks = self._num_blocks()
        self.kv = KVCacheManager(KVCacheConfig(self.num_blocks, config.block_size, config.enable_prefix_caching))
        self.scheduler = Scheduler(self._scheduler_config(), self.kv)
        backend = get_backend(config.attention_backend, self.device)
        self.runner = ModelRunner(self.model, self.num_blocks, config.block_size, backend, self.device)
        self.sampler = Sampler(mcfg.eos_token_ids, self.codec.token_text)
        self._seed_gen = torch.Generator().manual_seed(config.seed)
        self.groups: dict[str, RequestGroup] = {}
        self._arrivals = 0
        self._elapsed = 0.0
        self._generated = 0
        self._prompt_computed = 0
        self._ttft: dict[str, float] = {}
        self._tpot: dict[str, float] = {}

    # ------------------------------------------------------------------ construction helpers
    def _num_blocks(self) -> int:
        cfg = self.config
        per_block = kv_bytes_per_block(self.model, cfg.block_size)
        needed = cdiv(self.max_model_len, cfg.block_size)
        if cfg.num_kv_blocks is not None:
            num_blocks = cfg.num_kv_blocks
        elif cfg.kv_cache_memory is not None:
            num_blocks = cfg.kv_cache_memory // per_block
        else:  # the default budget, but never more than max_num_seqs full-length requests need
            num_blocks = min(DEFAULT_KV_CACHE_MEMORY // per_block, cfg.max_num_seqs * needed)
        if num_blocks < needed:
            raise ValueError(
                f"KV cache too small: {num_blocks} blocks of {cfg.block_size} tokens cannot hold one "
                f"request of max_model_len={self.max_model_len}; need num_kv_blocks >= {needed} "
                f"(kv_cache_memory >= {needed * per_block} bytes) or a smaller max_model_len"
            )
        return num_blocks

    def _scheduler_config(self) -> SchedulerConfig:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        if budget is None:
            budget = max(DEFAULT_MAX_NUM_BATCHED_TOKENS, cfg.max_num_seqs)
            if not cfg.enable_chunked_prefill:
                budget = max(budget, self.max_model_len)
        return SchedulerConfig(
            max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=budget, max_model_len=self.max_model_len,
            enable_chunked_prefill=cfg.enable_chunked_prefill,
            long_prefill_token_threshold=cfg.long_prefill_token_threshold, policy=cfg.policy,
        )

    # ------------------------------------------------------------------ requests
    def process(self, prompt, params: SamplingParams | None) -> tuple[ProcessedPrompt, SamplingParams]:
        """Validate a prompt and its params without touching engine state; the params returned
        are the engine's own copy."""
        params = SamplingParams() if params is None else params
        if isinstance(params, SamplingParams):
            params = params.clone()  # re-validated: the caller may have changed fields since
        processed = process_prompt(prompt, self.codec)
        validate_request(processed, params, self.limits, self.codec.has_tokenizer)
        max_tokens = params.max_tokens or self.max_model_len
        need = cdiv(min(len(processed.prompt_token_ids) + max_tokens, self.max_model_len), self.config.block_size)
        if need > self.num_blocks:  # cannot happen with a validated config; kept as the last guard
            raise ValueError(f"request needs {need} KV blocks but the cache has {self.num_blocks}")
        return processed, params

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    priority: int = 0) -> None:
        """Queue a request; raises ValueError (changing nothing) when it cannot be served."""
        check_request_id(request_id)
        if request_id in self.groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        processed, params = self.process(prompt, params)
        seqs = make_sequences(params, draw_base_seed(self._seed_gen))
        group = RequestGroup(request_id, processed.prompt, processed.prompt_token_ids, params, self.stop_ctx)
        for seq in seqs:
            group.samples.append(Request(SampleId(request_id, seq.index), group, seq, list(processed.prompt_token_ids),
                                         arrival=self._arrivals, priority=priority))
            self._arrivals += 1
        group.pending_forks = group.samples[1:]
        self.groups[request_id] = group
        self.scheduler.add(group.samples[0])

    def abort_request(self, request_id: str | list[str]) -> None:
        """Finish the request(s) with "abort" and free every block they hold; unknown ids ignored.

        O(samples) per request: samples still waiting to fork are in no queue and hold no blocks.
        """
        for rid in request_ids_to_abort(request_id):
            group = self.groups.pop(rid, None)
            if group is None:
                continue
            unforked = {id(sample) for sample in group.pending_forks}
            group.pending_forks = []
            queued = []
            for sample in group.samples:
                if not sample.finished:
                    sample.seq.finish("abort")
                if sample.status is not Status.FINISHED and id(sample) not in unforked:
                    queued.append(sample)
            self.scheduler.remove_all(queued)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def get_num_unfinished_requests(self) -> int:
        return len(self.groups)

    def get_metrics(self) -> EngineMetrics:
        return EngineMetrics(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_usage=self.kv.usage, prefix_cache_hit_rate=self.kv.stats.hit_rate,
            num_preemptions=self.scheduler.num_preemptions, num_generated_tokens=self._generated,
            num_prompt_tokens_computed=self._prompt_computed, elapsed_s=self._elapsed,
            ttft_s=dict(self._ttft), tpot_s=dict(self._tpot),
        )

    # ------------------------------------------------------------------ stepping
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        inputs = self.runner.prepare(out.scheduled, self.kv)
        hidden = self.runner.execute(inputs)
        touched = self._advance(out.scheduled, inputs, hidden)
        rows = self._sampling_rows(inputs)
        if rows:
            self._sample(rows, hidden)
        outputs = self._collect(touched)
        self._elapsed += time.perf_counter() - t0
        return outputs

    def _advance(self, scheduled: list[ScheduledRequest], inputs: StepInputs, hidden: torch.Tensor):
        """Mark the scheduled tokens computed, cache full blocks, gather prompt logprobs."""
        touched: dict[str, RequestGroup] = {}
        row = 0
        for s in scheduled:
            r = s.request
            if r.params.prompt_logprobs is not None and r.seq.index == 0:
                self._prompt_logprobs(r, s, hidden[row: row + s.num_new_tokens])
            row += s.num_new_tokens
            self._prompt_computed += max(0, min(s.start + s.num_new_tokens, r.num_prompt_tokens) - s.start)
            r.num_computed_tokens += s.num_new_tokens
            self.kv.cache_full_blocks(r.request_id, r.token_ids, r.num_computed_tokens)
            touched[r.group.request_id] = r.group
        return touched

    def _prompt_logprobs(self, r: Request, s: ScheduledRequest, hidden: torch.Tensor) -> None:
        """Position p's hidden state scores prompt token p + 1; entry 0 is None."""
        group, k = r.group, r.params.prompt_logprobs
        if group.prompt_logprobs is None:
            group.prompt_logprobs = [None]
        end = min(s.start + s.num_new_tokens, r.num_prompt_tokens - 1)
        first = len(group.prompt_logprobs) - 1  # positions already scored (recompute skips them)
        if end <= max(first, s.start):
            return
        rows = hidden[max(first, s.start) - s.start: end - s.start]
        lp = torch.log_softmax(self.model.compute_logits(rows), dim=-1)
        top = torch.sort(lp, dim=-1, descending=True, stable=True).indices[:, :k].tolist()
        for j, p in enumerate(range(max(first, s.start), end)):
            tok = group.prompt_token_ids[p + 1]
            group.prompt_logprobs.append(logprob_entry(lp[j], tok, top[j], self.codec.token_text))

    def _sampling_rows(self, inputs: StepInputs) -> list[tuple[Request, int]]:
        """(sample, hidden row) pairs; forks off a finished prompt share their parent's row."""
        rows = []
        for s, hidden_row in zip(inputs.samplers, inputs.sample_rows):
            r = s.request
            rows.append((r, hidden_row))
            if r.seq.index == 0 and r.group.pending_forks and not r.seq.output_ids:
                rows += [(child, hidden_row) for child in self._fork(r)]
        return rows

    def _fork(self, parent: Request) -> list[Request]:
        """Children that now share the parent's prompt blocks; the rest recompute from waiting."""
        forked = []
        for child in parent.group.pending_forks:
            copies = self.kv.fork(parent.request_id, child.request_id)
            if copies is not None and self.scheduler.add_running(child):
                self.runner.copy_blocks(copies)
                child.num_computed_tokens = parent.num_computed_tokens
                forked.append(child)
                continue
            if copies is not None:
                self.kv.free(child.request_id)
            self.scheduler.add(child)
        parent.group.pending_forks = []
        return forked

    def _sample(self, rows: list[tuple[Request, int]], hidden: torch.Tensor) -> None:
        index = torch.tensor([h for _, h in rows], device=hidden.device)
        logits = self.model.compute_logits(hidden[index]).cpu()
        result = self.sampler(logits, [SamplingRow(r.params, r.group.prompt_token_ids, r.seq.output_ids,
                                                   r.seq.generator) for r, _ in rows])
        now = time.perf_counter()
        for (r, _), tok, entry, lp in zip(rows, result.token_ids, result.logprobs, result.sampled_logprobs):
            if entry is not None:
                r.seq.logprobs.append(entry)
                r.seq.cumulative_logprob += lp
            r.append_token(tok)
            self._generated += 1
            group = r.group
            if group.first_token_time is None:
                group.first_token_time = now
            if r.finished:
                self.scheduler.remove(r)
                if group.finished:
                    group.finish_time = now

    def _collect(self, touched: dict[str, RequestGroup]) -> list[RequestOutput]:
        outputs = []
        for rid, group in touched.items():
            if self.groups.get(rid) is not group:
                continue
            outputs.append(group.to_output())
            if group.finished:
                del self.groups[rid]
                self._record_latency(group)
        return outputs

    def _record_latency(self, group: RequestGroup) -> None:
        """TTFT/TPOT of the latest MAX_LATENCY_RECORDS finished requests (bounded for servers)."""
        if group.first_token_time is None or group.finish_time is None:
            return
        self._ttft[group.request_id] = group.first_token_time - group.arrival_time
        n = max(len(s.seq.output_ids) for s in group.samples)
        if n > 1:
            self._tpot[group.request_id] = (group.finish_time - group.first_token_time) / (n - 1)
        for records in (self._ttft, self._tpot):
            while len(records) > MAX_LATENCY_RECORDS:
                del records[next(iter(records))]  # dicts keep insertion order: drop the oldest
