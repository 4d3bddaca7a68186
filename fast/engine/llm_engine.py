"""`fast.LLMEngine`: add_request / step / abort_request over the continuous-batching pipeline.

The engine only orchestrates; one step is

    Scheduler.schedule()                -> SchedulerOutput      (plain data: who runs, which blocks)
    StructuredOutputManager             -> its grammar bitmask  (constrained samples that sample)
    Executor.execute_model(...)         -> ModelRunnerOutput    (workers: forward, sample)
    Scheduler.update_from_output(...)   -> the requests that changed (tokens, stop rules, freeing)
    -> RequestOutputs

With `trace` on, a `fast.trace.Tracer` is called between these layers and records the step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fast.config import EngineConfig, cdiv
from fast.core.kv_cache_manager import KVCacheConfig, KVCacheManager
from fast.core.request import Request, RequestGroup, SampleId, Status
from fast.core.scheduler import Scheduler
from fast.core.structured_output import StructuredOutputManager
from fast.executor import Executor
from fast.worker.model import check_tensor_parallel
from ref.inputs import (
    ProcessedPrompt, RequestLimits, bad_words_token_ids, check_request_id, process_prompt, request_ids_to_abort,
    truncate_prompt, validate_request,
)
from ref.outputs import RequestOutput
from ref.sampling_params import SamplingParams
from ref.sequence import StopContext, draw_base_seed, sample_seed
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


class LLMEngine:
    """Continuous batching over a paged KV cache. Not thread-safe."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.resolved = config.resolve()
        mcfg = self.resolved.model.hf
        self.max_model_len = self.resolved.model.max_model_len
        self.codec = TextCodec(None if config.skip_tokenizer_init else load_tokenizer(config.model))
        self.limits = RequestLimits(mcfg.vocab_size, self.max_model_len, config.max_logprobs, config.max_n)
        self.stop_ctx = StopContext(mcfg.eos_token_ids, self.max_model_len, self.codec)
        self.num_blocks = self.resolved.cache.num_blocks
        self.kv = KVCacheManager(KVCacheConfig(self.num_blocks, config.block_size, config.enable_prefix_caching))
        self.scheduler = Scheduler(self.resolved.scheduler, self.kv)
        self.structured = StructuredOutputManager(self.codec.tokenizer, mcfg.vocab_size, mcfg.eos_token_ids)
        check_tensor_parallel(mcfg, self.resolved.parallel.world_size)  # before any worker starts
        self.executor = Executor.create(self.resolved)  # builds the workers: model shards, KV caches
        self._seed_gen = torch.Generator().manual_seed(config.seed)
        self.groups: dict[str, RequestGroup] = {}
        self._arrivals = 0
        self._elapsed = 0.0
        self._ttft: dict[str, float] = {}
        self._tpot: dict[str, float] = {}
        self.tracer = None  # off: each step pays four `is not None` checks, nothing else
        if config.trace:
            from fast.trace import Tracer

            self.tracer = Tracer(self, None if config.trace is True else config.trace)

    def shutdown(self) -> None:
        """Stop the workers (worker processes exit); the engine is unusable afterwards."""
        self.executor.shutdown()
        if self.tracer is not None:
            self.tracer.close()

    # ------------------------------------------------------------------ requests
    def process(self, prompt, params: SamplingParams | None) -> tuple[ProcessedPrompt, SamplingParams]:
        """Validate a prompt and its params without touching engine state; the params returned
        are the engine's own copy."""
        params = SamplingParams() if params is None else params
        if isinstance(params, SamplingParams):
            params = params.clone()  # re-validated: the caller may have changed fields since
        processed = truncate_prompt(process_prompt(prompt, self.codec), params)
        validate_request(processed, params, self.limits, self.codec.has_tokenizer)
        if params.structured_outputs is not None:
            self.structured.compile(params.structured_outputs)  # a bad constraint fails here
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
        base_seed = draw_base_seed(self._seed_gen)
        compiled = None if params.structured_outputs is None else self.structured.compile(params.structured_outputs)
        group = RequestGroup(request_id, processed.prompt, processed.prompt_token_ids, params, self.stop_ctx)
        if params.bad_words:
            group.bad_words_token_ids = bad_words_token_ids(self.codec, params.bad_words)
        for i in range(params.n):
            p = params.for_sample(i)
            sample = Request(SampleId(request_id, i), group, i, p, sample_seed(p, base_seed, i),
                             list(processed.prompt_token_ids), arrival=self._arrivals, priority=priority)
            if compiled is not None:
                sample.grammar = self.structured.new_matcher(compiled)
            group.samples.append(sample)
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
                    sample.finish("abort")
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
            num_preemptions=self.scheduler.num_preemptions, num_generated_tokens=self.scheduler.num_generated_tokens,
            num_prompt_tokens_computed=self.scheduler.num_prompt_tokens_computed, elapsed_s=self._elapsed,
            ttft_s=dict(self._ttft), tpot_s=dict(self._tpot),
        )

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """One step; the cumulative outputs of the requests that progressed (SPEC §2)."""
        return self._step(report_running=True)

    def step_finished(self) -> list[RequestOutput]:
        """`step()` reporting only the requests that finished in this step: all `LLM.generate`
        reads. A cumulative output copies its prompt, token ids, logprobs and text, O(context)
        for each running request at each step; here a running request costs nothing."""
        return self._step(report_running=False)

    def _step(self, report_running: bool) -> list[RequestOutput]:
        t0 = time.perf_counter()
        tracer = self.tracer
        if tracer is not None:
            tracer.step_started()
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            return []
        if scheduler_output.structured_req_ids:
            requests = self.scheduler.requests
            scheduler_output.grammar_bitmask = self.structured.grammar_bitmask(
                [requests[i].grammar for i in scheduler_output.structured_req_ids]).numpy()
        if tracer is not None:
            tracer.scheduled(scheduler_output)
        runner_output = self.executor.execute_model(scheduler_output)
        if tracer is not None:
            tracer.executed(runner_output)
        touched = self.scheduler.update_from_output(scheduler_output, runner_output)
        if not report_running:
            touched = [group for group in touched if group.finished]
        outputs = self._collect(touched)
        self._elapsed += time.perf_counter() - t0
        if tracer is not None:
            tracer.step_finished()
        return outputs

    def _collect(self, touched: list[RequestGroup]) -> list[RequestOutput]:
        outputs = []
        for group in touched:
            rid = group.request_id
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
        n = max(s.num_output_tokens for s in group.samples)
        if n > 1:
            self._tpot[group.request_id] = (group.finish_time - group.first_token_time) / (n - 1)
        for records in (self._ttft, self._tpot):
            while len(records) > MAX_LATENCY_RECORDS:
                del records[next(iter(records))]  # dicts keep insertion order: drop the oldest
