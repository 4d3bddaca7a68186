"""Prometheus metrics of one server, in its own `CollectorRegistry` (two apps never collide).

Two sources:
- per request, from `AsyncLLMEngine` finish listeners (counted once per engine request, i.e. per
  prompt of an API call): finished requests by reason, prompt tokens, TTFT and TPOT histograms;
  plus the API calls the server rejected (4xx);
- engine state, read between steps at scrape time: running/waiting requests, KV usage and blocks,
  prefix-cache hit rate, and the engine's cumulative preemption / token counters.

| name                                         | type      | meaning                                    |
|----------------------------------------------|-----------|--------------------------------------------|
| pagedlm_requests_finished_total{finish_reason}| counter  | stop / length / abort                      |
| pagedlm_requests_rejected_total              | counter   | API calls answered with a 4xx error        |
| pagedlm_prompt_tokens_total                  | counter   | prompt tokens of finished requests         |
| pagedlm_generation_tokens_total              | counter   | tokens the engine sampled (all samples)    |
| pagedlm_prompt_tokens_computed_total         | counter   | prompt tokens run through the model        |
| pagedlm_num_preemptions_total                | counter   | preemptions by recompute                   |
| pagedlm_num_requests_running / _waiting      | gauge     | scheduler queues                           |
| pagedlm_kv_cache_usage_ratio                 | gauge     | fraction of KV blocks held by a request    |
| pagedlm_kv_cache_blocks{state="free"/"total"}| gauge     | KV pool size and free blocks               |
| pagedlm_prefix_cache_hit_rate                | gauge     | prefix-cache hits / lookups                |
| pagedlm_time_to_first_token_seconds          | histogram | add -> first token (server side)           |
| pagedlm_time_per_output_token_seconds        | histogram | (finish - first token) / (tokens - 1)      |
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fast.engine.async_llm_engine import AsyncLLMEngine, RequestStats
from ref.outputs import FINISH_REASONS

if TYPE_CHECKING:  # fast.engine.llm_engine imports torch, which `python -m fast.entrypoints.openai_server --help` does not need
    from fast.engine.llm_engine import EngineMetrics

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class _EngineStateCollector:
    """Exposes the engine snapshot taken just before each scrape."""

    def __init__(self) -> None:
        self.metrics: EngineMetrics | None = None
        self.blocks: tuple[int, int] = (0, 0)  # (free, total)

    def collect(self):
        m = self.metrics
        if m is None:
            return
        yield GaugeMetricFamily("pagedlm_num_requests_running", "Requests in the running queue", value=m.num_running)
        yield GaugeMetricFamily("pagedlm_num_requests_waiting", "Requests in the waiting queue", value=m.num_waiting)
        yield GaugeMetricFamily("pagedlm_kv_cache_usage_ratio", "Fraction of KV blocks held by a request",
                                value=m.kv_usage)
        blocks = GaugeMetricFamily("pagedlm_kv_cache_blocks", "KV cache blocks", labels=["state"])
        blocks.add_metric(["free"], self.blocks[0])
        blocks.add_metric(["total"], self.blocks[1])
        yield blocks
        yield GaugeMetricFamily("pagedlm_prefix_cache_hit_rate", "Prefix-cache hits / lookups",
                                value=m.prefix_cache_hit_rate)
        yield CounterMetricFamily("pagedlm_num_preemptions", "Preemptions by recompute", value=m.num_preemptions)
        yield CounterMetricFamily("pagedlm_generation_tokens", "Tokens sampled by the engine",
                                  value=m.num_generated_tokens)
        yield CounterMetricFamily("pagedlm_prompt_tokens_computed", "Prompt tokens run through the model",
                                  value=m.num_prompt_tokens_computed)


class ServerMetrics:
    """The metrics of one app; `render()` gives the Prometheus text exposition."""

    def __init__(self, engine: AsyncLLMEngine):
        self._engine = engine
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests_finished = Counter("pagedlm_requests_finished", "Finished requests by finish reason",
                                         ["finish_reason"], registry=r)
        for reason in FINISH_REASONS:
            self.requests_finished.labels(reason)
        self.requests_rejected = Counter("pagedlm_requests_rejected", "API calls answered with a 4xx error",
                                         registry=r)
        self.prompt_tokens = Counter("pagedlm_prompt_tokens", "Prompt tokens of finished (and aborted) requests",
                                     registry=r)
        self.ttft = Histogram("pagedlm_time_to_first_token_seconds", "Time to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("pagedlm_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=TPOT_BUCKETS, registry=r)
        self._state = _EngineStateCollector()
        r.register(self._state)
        engine.add_finish_listener(self.observe)

    def observe(self, stats: RequestStats) -> None:
        self.requests_finished.labels(stats.finish_reason).inc()
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        if stats.ttft_s is not None:
            self.ttft.observe(stats.ttft_s)
        if stats.tpot_s is not None:
            self.tpot.observe(stats.tpot_s)

    async def render(self) -> bytes:
        self._state.metrics = await self._engine.get_metrics()
        self._state.blocks = await self._engine.kv_blocks()
        return generate_latest(self.registry)
