"""The step tracer: what `fast` did at each step, recorded at its layer boundaries.

Off by default (`EngineConfig.trace=False`): the engine then holds `tracer = None` and a step
pays four `is not None` checks. On, the engine calls, in every step that runs the model,

    tracer.step_started()                      before Scheduler.schedule()
    tracer.scheduled(scheduler_output)         the plan: who runs, prefill chunk or decode, preemptions
    tracer.executed(runner_output)             the sampled tokens
    tracer.step_finished()                     after update_from_output and the outputs: KV state

and the tracer keeps one JSON-ready dict per step (`records`; the schema is SPEC's "Step trace"
and `fast/trace/schema.py`), written as JSON lines when given a path. Inside those boundaries the
layers (KV cache manager, model runner, model, attention backend, sampler) are timed by
`LayerTimer`, which wraps their entry points on this engine's own instances: the classes carry no
tracing code, so an engine with tracing off runs exactly the code it runs in production. Worker
processes (`mp`, `ray`, tensor parallelism) are not instrumented: their time is the `execute`
phase as a whole. On CUDA the layer times are host times (kernels run asynchronously).
"""

from __future__ import annotations

import json
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from fast.core.outputs import ModelRunnerOutput, SchedulerOutput

if TYPE_CHECKING:
    from fast.core.request import Request
    from fast.engine.llm_engine import LLMEngine

SCHEMA = "pagedlm-trace/1"
# Records kept in memory: trace=True keeps the latest 10,000 steps; with a file, which gets every
# step, memory keeps only the latest 100 (a record holds every block table: a long-running traced
# server must not grow without bound).
MAX_RECORDS = 10_000
MAX_RECORDS_WITH_FILE = 100

# layer -> (attribute path from the engine, method names): what LayerTimer wraps.
LAYERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "kv_lookup": ("kv", ("get_computed_blocks",)),
    "kv_allocate": ("kv", ("allocate_slots", "fork")),
    "kv_cache_blocks": ("kv", ("cache_full_blocks",)),
    "kv_free": ("kv", ("free",)),
    "structured_output": ("structured", ("grammar_bitmask",)),
    "update": ("scheduler", ("update_from_output",)),
    "output": ("", ("_collect",)),
    # in-process worker only (executor.driver_worker.model_runner = "runner")
    "runner_inputs": ("runner", ("update_states", "prepare")),
    "model_forward": ("runner.model", ("forward",)),
    "attention": ("runner.backend", ("forward", "store_kv")),
    "copy_blocks": ("runner", ("copy_blocks",)),
    "logits": ("runner.model", ("compute_logits",)),
    "sampler": ("runner", ("sampler",)),
}


def sample_key(sample_id) -> str:
    """A sample's id in the trace: '<request id>#<sample index>' (split at the last '#')."""
    return str(sample_id)


class LayerTimer:
    """Seconds spent in each layer of `LAYERS` during the current step (outermost calls only)."""

    def __init__(self, engine: "LLMEngine"):
        self.seconds: dict[str, float] = {}
        self._active: set[str] = set()
        runner = getattr(getattr(engine.executor, "driver_worker", None), "model_runner", None)
        self.in_process = runner is not None
        roots = {"": engine, "kv": engine.kv, "structured": engine.structured, "scheduler": engine.scheduler,
                 "runner": runner, "runner.model": getattr(runner, "model", None),
                 "runner.backend": getattr(runner, "backend", None)}
        for layer, (path, methods) in LAYERS.items():
            obj = roots[path]
            if obj is None:
                continue
            for method in methods:
                self._wrap(obj, method, layer)

    def _wrap(self, obj: Any, method: str, layer: str) -> None:
        inner = getattr(obj, method)

        def timed(*args, **kwargs):
            if layer in self._active:  # a nested call of the same layer is already being timed
                return inner(*args, **kwargs)
            self._active.add(layer)
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[layer] = self.seconds.get(layer, 0.0) + time.perf_counter() - t0
                self._active.discard(layer)

        setattr(obj, method, timed)  # an instance attribute: shadows the class's method

    def take(self) -> dict[str, float]:
        """The step's times in ms, and a fresh count for the next step."""
        ms = {layer: round(1e3 * s, 4) for layer, s in self.seconds.items()}
        self.seconds = {}
        return ms


class TraceLog:
    """Where a trace goes: the latest `max_records` step records in memory, and, with a `path`,
    the meta line then every record as JSON lines (flushed per record: a trace is read while, or
    after, an engine dies)."""

    def __init__(self, meta: dict, path: str | None = None, max_records: int | None = None):
        self.meta = meta
        if max_records is None:
            max_records = MAX_RECORDS if path is None else MAX_RECORDS_WITH_FILE
        self.records: deque[dict] = deque(maxlen=max_records)
        self._file = open(path, "w", encoding="utf-8") if path else None  # noqa: SIM115 - closed in close()
        self._write(meta)

    def append(self, record: dict) -> None:
        self.records.append(record)
        self._write(record)

    def _write(self, obj: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(obj, separators=(",", ":")) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class BlockChanges:
    """`block_changes` of consecutive records: per sample, the blocks added to its table since
    the previous call, or its whole table freed (a table that is not a growth of the previous one
    is reported as replaced)."""

    def __init__(self) -> None:
        self._tables: dict[str, list[int]] = {}

    def __call__(self, tables: dict[str, list[int]]) -> dict:
        changes: dict[str, dict] = {}
        for key, table in tables.items():
            before = self._tables.get(key, [])
            if table[:len(before)] == before:
                if len(table) > len(before):
                    changes[key] = {"added": table[len(before):]}
            else:
                changes[key] = {"replaced": before, "added": table}
        for key, before in self._tables.items():
            if key not in tables:
                changes[key] = {"freed": before}
        self._tables = {key: list(table) for key, table in tables.items()}
        return changes


class Tracer:
    """Builds one record per engine step that ran the model; see the module docstring."""

    def __init__(self, engine: "LLMEngine", path: str | None = None, max_records: int | None = None):
        self.engine = engine
        self.layers = LayerTimer(engine)
        self.log = TraceLog({**self._meta(engine), "layers_timed": self.layers.in_process}, path, max_records)
        self.meta, self.records = self.log.meta, self.log.records
        self._t0 = time.perf_counter()
        self._marks: list[float] = []  # this step's boundaries: started, scheduled, executed, finished
        self._num_steps = 0
        self._block_changes = BlockChanges()
        self._stats = engine.kv.stats
        self._record: dict | None = None
        self._requests: dict[str, "Request"] = {}

    @staticmethod
    def _meta(engine: "LLMEngine") -> dict:
        cfg, sched = engine.config, engine.scheduler.config
        policy = sched.policy if isinstance(sched.policy, str) else getattr(sched.policy, "name", type(sched.policy).__name__)
        return {"kind": "meta", "schema": SCHEMA, "engine": "fast", "model": cfg.model,
                "block_size": cfg.block_size, "num_blocks": engine.num_blocks,
                "max_num_batched_tokens": sched.max_num_batched_tokens, "max_num_seqs": sched.max_num_seqs,
                "max_model_len": engine.max_model_len, "policy": policy,
                "num_hidden_layers": engine.resolved.model.hf.num_hidden_layers,
                "enable_prefix_caching": cfg.enable_prefix_caching, "enable_chunked_prefill": cfg.enable_chunked_prefill,
                "executor": engine.resolved.parallel.executor_backend, "device": engine.resolved.device}

    # ------------------------------------------------------------------ the engine's hooks
    def step_started(self) -> None:
        self._marks = [time.perf_counter()]
        self.layers.take()  # drop anything timed between steps (e.g. a conformance probe)

    def scheduled(self, out: SchedulerOutput) -> None:
        self._marks.append(time.perf_counter())
        sched, kv, bs = self.engine.scheduler, self.engine.kv, self.engine.config.block_size
        admitted = {new.req_id for new in out.scheduled_new_reqs}
        admitted |= {c.req_id for c in out.scheduled_cached_reqs if c.resumed}
        self._requests = {}
        scheduled = []
        for sid, num_new in out.num_scheduled_tokens.items():
            r = sched.requests[sid]
            key = sample_key(sid)
            self._requests[key] = r
            start = r.num_computed_tokens
            kind = ("prefill" if r.num_output_tokens == 0 else
                    "decode" if start == r.num_tokens - 1 else "recompute")
            scheduled.append({
                "id": key, "kind": kind, "start": start, "tokens": num_new,
                "num_prompt_tokens": r.num_prompt_tokens, "num_output_tokens": r.num_output_tokens,
                "samples": start + num_new == r.num_tokens, "admitted": sid in admitted,
                "prefix_hit_tokens": start if sid in admitted else 0,
                # the blocks this step writes (positions start .. start + tokens - 1), as the
                # forward sees them: a sample freed later in the step keeps them in the record
                "blocks": kv.get_block_table(sid, start=start // bs)[:(start + num_new - 1) // bs - start // bs + 1],
            })
        for child in out.forked_reqs:
            self._requests[sample_key(child.req_id)] = sched.requests[child.req_id]
        self._record = {
            "kind": "step", "step": self._num_steps, "t_s": round(self._marks[0] - self._t0, 6),
            "num_scheduled_tokens": out.total_num_scheduled_tokens,
            "scheduled": scheduled,
            "forked": [[sample_key(c.fork_of), sample_key(c.req_id)] for c in out.forked_reqs],
            "preempted": [self._preemption(victim, cause) for victim, cause in
                          zip(out.preempted_req_ids, out.preempted_for)],
        }

    def executed(self, runner_output: ModelRunnerOutput) -> None:
        self._marks.append(time.perf_counter())
        self._record["sampled"] = {sample_key(sid): int(token) for sid, token in
                                   zip(runner_output.req_ids, runner_output.sampled_token_ids)}

    def step_finished(self) -> None:
        self._marks.append(time.perf_counter())
        engine, record = self.engine, self._record
        started, scheduled, executed, finished = self._marks
        record["duration_ms"] = round(1e3 * (finished - started), 4)
        record["phases_ms"] = {"schedule": round(1e3 * (scheduled - started), 4),
                               "execute": round(1e3 * (executed - scheduled), 4),
                               "update": round(1e3 * (finished - executed), 4)}
        record["layers_ms"] = self.layers.take() if self.layers.in_process else None
        record["finished"] = [{"id": key, "reason": r.finish_reason}
                              for key, r in self._requests.items() if r.finish_reason is not None]
        sched = engine.scheduler
        record["waiting"] = [sample_key(r.request_id) for r in sched.waiting]
        record["running"] = [sample_key(r.request_id) for r in sched.running]
        record["kv"] = self._kv_state()
        record["block_changes"] = self._block_changes(record["kv"]["tables"])
        record.update(self._cache_stats())
        record["totals"] = {
            "generated_tokens": sched.num_generated_tokens,
            "prompt_tokens_computed": sched.num_prompt_tokens_computed,
            "preemptions": sched.num_preemptions,
            "prefix_hit_tokens": self._stats.hits, "prefix_query_tokens": self._stats.queries,
            "prefix_cache_hit_rate": self._stats.hit_rate,
        }
        self._num_steps += 1
        self.log.append(record)
        self._record, self._requests = None, {}

    # ------------------------------------------------------------------ pieces of a record
    def _preemption(self, victim, cause) -> dict:
        policy = self.meta["policy"]
        if victim == cause:
            why = f"{sample_key(cause)} needed a KV block, none was free, and {policy} preempts it itself"
        else:
            why = f"{sample_key(cause)} needed a KV block, none was free; {policy} picks {sample_key(victim)}"
        return {"id": sample_key(victim), "needed_by": sample_key(cause), "reason": why}

    def _kv_state(self) -> dict:
        kv = self.engine.kv
        tables, num_tokens = {}, {}
        for rid in kv.request_ids():
            tables[sample_key(rid)] = kv.get_block_table(rid)
            num_tokens[sample_key(rid)] = kv.get_num_tokens(rid)
        return {"num_free": kv.num_free_blocks, "usage": kv.usage, "tables": tables, "num_tokens": num_tokens,
                "cached": sorted(kv.cached_block_ids()), "free": kv.free_block_ids()}

    def _cache_stats(self) -> dict:
        before, after = self._stats, self.engine.kv.stats
        self._stats = after
        reused = after.blocks_reused - before.blocks_reused
        allocated = after.blocks_allocated - before.blocks_allocated
        return {
            "prefix_cache": {"queries": after.queries - before.queries, "hits": after.hits - before.hits,
                             "blocks_evicted": after.blocks_evicted - before.blocks_evicted,
                             "blocks_reused": reused, "blocks_allocated": allocated},
            "block_reuse_rate": {"step": reused / (reused + allocated) if reused + allocated else None,
                                 "cumulative": after.block_reuse_rate},
        }

    def close(self) -> None:
        self.log.close()


def read_trace(path) -> tuple[dict, list[dict]]:
    """(meta, step records) of a JSON-lines trace file."""
    meta, steps = None, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            if obj.get("kind") == "meta":
                meta = obj
            else:
                steps.append(obj)
    if meta is None:
        raise ValueError(f"{path}: no meta line (kind='meta'): not a pagedlm trace")
    return meta, steps
