"""The step trace of the reference engine, observed from outside: `RefObserver`.

`ref` is the oracle and carries no tracing code, so this module never modifies it: it reads the
engine's state before and after `ref.LLMEngine.step()` and writes the record `fast`'s `Tracer`
writes (`fast/trace/schema.py`, engine "ref"), so one renderer shows both engines: ref's
contiguous per-row reservation next to fast's paged blocks.

What a ref step is, and how it maps onto the schema:

- A step either forms a new static batch from the waiting queue and prefills it (every row
  `scheduled` as kind "prefill", start 0, tokens = its prompt length, admitted) or runs one decode
  step of the current batch (every unfinished row, kind "decode", tokens 1). A step that forms no
  batch runs no model and gets no record, as in fast. Sample ids are '<request id>#<Sequence.index>'
  (ref numbers a request's n samples 0..n-1, as fast does).
- `num_scheduled_tokens` is the positions the forward pass computed, padding included: B × the
  longest prompt on a prefill (prompts are right-padded), B on a decode (finished rows still run,
  rewriting their slot 0). The real tokens are the sum of `scheduled[*].tokens`; the gap is ref's
  padding waste. The meta's `max_num_batched_tokens` is null: ref has no token budget.
- `kv` lays the batch's one contiguous cache (`B` rows × `cache.max_len` slots) out in a virtual
  pool of `num_blocks` blocks of `block_size` slots::

      row 0: blocks [0, R)   row 1: blocks [R, 2R)   ...   row B-1: [(B-1)R, BR)   free: [BR, num_blocks)
      R = ceil(cache.max_len / block_size): each row's whole reservation, taken at prefill

  `num_tokens` of a row is the slots holding its live K/V: prompt + outputs - 1 while it runs,
  0 once finished (exactly what `LLMEngine._account_kv` counts as used). A finished row keeps its
  table: ref frees the cache only when the next batch replaces it, so the reservation of finished
  rows stays visible (and shows up as `freed` in the step that forms the next batch).
- Budget overflow: a batch whose reservation needs more than `num_blocks` blocks raises
  ValueError before the step runs (the engine is left untouched): give a larger `num_blocks` or
  a smaller `max_batch`. A contiguous engine with that memory could not have run that batch.
- `prefix_cache` is null and `block_reuse_rate` all null (ref shares nothing); `preempted` and
  `forked` are empty (ref neither preempts nor forks: each of n samples is its own row, and its
  prompt is prefilled once per row, which `prompt_tokens_computed` counts).
- `phases_ms` is {"prefill": ms} or {"decode": ms}: the whole `engine.step()` (batch forming,
  forward, sampling, outputs); ref cannot be timed inside without editing it, so `layers_ms` is
  null and the meta says `layers_timed: false`.
- `totals` has the schema's counters (generated tokens and prompt tokens since the observer was
  made, preemptions 0) plus ref's own KV accounting, `kv_slot_steps_reserved` and
  `kv_slot_steps_used`, computed here from the batch and equal to `engine.get_metrics()`'s.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from fast.trace.tracer import SCHEMA, BlockChanges, TraceLog, sample_key

if TYPE_CHECKING:
    from ref.engine import LLMEngine, Request, StaticBatch
    from ref.sequence import Sequence

POLICY = "static batch (fcfs)"
NO_TOKEN = -1  # `sampled` value of a row that finished without a token (SPEC §5 rule 0)


def row_key(req: "Request", seq: "Sequence") -> str:
    """A ref row's sample id in the trace: '<request id>#<sample index>'."""
    return sample_key(f"{req.request_id}#{seq.index}")


def live_slots(req: "Request", seq: "Sequence") -> int:
    """Slots of a row holding live K/V after a step: prompt + outputs - 1 (the last sampled token
    is not written yet); 0 once the row finished (as `LLMEngine._account_kv` counts)."""
    if seq.finished:
        return 0
    return len(req.prompt_token_ids) + len(seq.output_ids) - 1


class RefObserver:
    """Steps a `ref.LLMEngine` and keeps one trace record per step that ran the model.

    Invariants of every record (see the module docstring for the mapping):
    - row b of the batch owns blocks [b*R, (b+1)*R), R = ceil(cache.max_len / block_size), from
      the prefill that formed the batch until the next batch replaces it;
    - sum of `kv.num_tokens` == the slots `_account_kv` counts as used in that step;
    - `kv.free` + the tables' blocks == range(num_blocks), disjoint.
    """

    def __init__(self, engine: "LLMEngine", num_blocks: int, block_size: int, path: str | None = None,
                 max_records: int | None = None):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.engine = engine
        self.num_blocks, self.block_size = num_blocks, block_size
        meta = {"kind": "meta", "schema": SCHEMA, "engine": "ref", "model": engine.config.model,
                "block_size": block_size, "num_blocks": num_blocks, "max_num_batched_tokens": None,
                "max_num_seqs": engine.config.max_batch, "max_model_len": engine.max_model_len,
                "num_hidden_layers": engine.model_config.num_hidden_layers, "policy": POLICY, "layers_timed": False}
        self.log = TraceLog(meta, path, max_records)
        self.meta, self.records = self.log.meta, self.log.records
        self._t0 = time.perf_counter()
        self._num_steps = 0
        self._block_changes = BlockChanges()  # a row's table is added at its prefill, freed at the next
        m = engine.metrics  # ref's KV counters may already hold earlier steps: continue from them
        self._totals = {"generated_tokens": 0, "prompt_tokens_computed": 0, "preemptions": 0,
                        "kv_slot_steps_reserved": m.kv_slot_steps_reserved,
                        "kv_slot_steps_used": m.kv_slot_steps_used}

    # ------------------------------------------------------------------ stepping
    def step(self) -> list:
        """`engine.step()`, recorded; returns its outputs unchanged."""
        engine = self.engine
        old_batch = engine.batch
        forms = old_batch is None or old_batch.done
        if forms:
            self._check_budget(*self._next_batch_shape())
            before = {}
        else:  # the rows a decode step runs, and their output counts before it
            before = {id(seq): len(seq.output_ids) for _, seq in old_batch.rows if not seq.finished}
        started = time.perf_counter()
        outputs = engine.step()
        ms = round(1e3 * (time.perf_counter() - started), 4)
        batch = engine.batch
        if batch is None:  # no waiting request: no batch formed, no model ran
            return outputs
        if forms:
            before = {id(seq): 0 for _, seq in batch.rows}
        record = {"kind": "step", "step": self._num_steps, "t_s": round(started - self._t0, 6),
                  "duration_ms": ms, "phases_ms": {"prefill" if forms else "decode": ms}, "layers_ms": None}
        record.update(self._work(batch, forms, before))
        record["waiting"] = [row_key(req, seq) for req in engine.waiting for seq in req.seqs]
        record["running"] = [row_key(req, seq) for req, seq in batch.rows if not seq.finished]
        record["kv"] = self._kv_state(batch)
        record["block_changes"] = self._block_changes(record["kv"]["tables"])
        record["prefix_cache"] = None
        record["block_reuse_rate"] = {"step": None, "cumulative": None}
        self._totals["kv_slot_steps_reserved"] += len(batch.rows) * batch.cache.max_len
        self._totals["kv_slot_steps_used"] += sum(record["kv"]["num_tokens"].values())
        record["totals"] = dict(self._totals)
        self._num_steps += 1
        self.log.append(record)
        return outputs

    def _next_batch_shape(self) -> tuple[int, int]:
        """(rows, cache.max_len) of the batch the next step forms: `LLMEngine._form_batch`'s rule
        (whole requests in queue order while their samples fit in max_batch), read-only."""
        engine, rows, max_len = self.engine, 0, 0
        for req in engine.waiting:
            if rows + req.params.n > engine.config.max_batch:
                break
            rows += req.params.n
            max_len = max(max_len, engine._reservation(req))
        return rows, max_len

    def _check_budget(self, rows: int, max_len: int) -> None:
        needed = rows * math.ceil(max_len / self.block_size)
        if needed > self.num_blocks:
            raise ValueError(
                f"ref's static batch reserves {rows} rows x {max_len} slots = {needed} blocks of "
                f"{self.block_size}, more than num_blocks={self.num_blocks}: give RefObserver a larger "
                f"num_blocks or the engine a smaller max_batch")

    # ------------------------------------------------------------------ pieces of a record
    def _work(self, batch: "StaticBatch", forms: bool, before: dict[int, int]) -> dict:
        """scheduled / sampled / finished / num_scheduled_tokens of this step's rows (`before`:
        id(seq) -> its output count before the step, for the rows the step ran)."""
        scheduled, sampled, finished = [], {}, []
        for req, seq in batch.rows:
            if id(seq) not in before:
                continue
            key, num_out, prompt_len = row_key(req, seq), before[id(seq)], len(req.prompt_token_ids)
            scheduled.append({
                "id": key, "kind": "prefill" if forms else "decode", "start": 0 if forms else prompt_len + num_out - 1,
                "tokens": prompt_len if forms else 1, "num_prompt_tokens": prompt_len, "num_output_tokens": num_out,
                "samples": True, "admitted": forms, "prefix_hit_tokens": 0,
            })
            got_token = len(seq.output_ids) > num_out
            sampled[key] = int(seq.output_ids[-1]) if got_token else NO_TOKEN
            self._totals["generated_tokens"] += int(got_token)
            if seq.finished:
                finished.append({"id": key, "reason": seq.finish_reason})
        if forms:
            self._totals["prompt_tokens_computed"] += sum(s["tokens"] for s in scheduled)
            padded = len(batch.rows) * max(len(req.prompt_token_ids) for req, _ in batch.rows)
        else:
            padded = len(batch.rows)
        return {"num_scheduled_tokens": padded, "scheduled": scheduled, "forked": [], "preempted": [],
                "sampled": sampled, "finished": finished}

    def _kv_state(self, batch: "StaticBatch") -> dict:
        """The batch's contiguous cache in the virtual pool (module docstring's diagram)."""
        per_row = math.ceil(batch.cache.max_len / self.block_size)
        self._check_budget(len(batch.rows), batch.cache.max_len)
        tables, num_tokens = {}, {}
        for b, (req, seq) in enumerate(batch.rows):
            key = row_key(req, seq)
            tables[key] = list(range(b * per_row, (b + 1) * per_row))
            num_tokens[key] = live_slots(req, seq)
        reserved = len(batch.rows) * per_row
        free = list(range(reserved, self.num_blocks))
        return {"num_free": len(free), "usage": reserved / self.num_blocks, "tables": tables,
                "num_tokens": num_tokens, "cached": [], "free": free}

    def close(self) -> None:
        self.log.close()
