"""The step tracer (fast/trace/tracer.py): one record per step, consistent with the engine's own
counters and with the KV cache manager's state at every step; tracing changes no output.

The checks read the engine's state themselves (the executor's calls, the KV manager's tables and
its block pool) instead of trusting the tracer's reading of it.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fast import LLM, EngineConfig, LLMEngine, SamplingParams
from fast.trace import read_trace, sample_key
from fast.trace.schema import META_SCHEMA, STEP_SCHEMA

# Small pool, small budget: chunked prefills, prefix hits (shared prefix), forks (n=2) and preemptions.
OPTIONS = dict(max_model_len=64, block_size=4, num_kv_blocks=24, max_num_batched_tokens=24, max_num_seqs=6)
PREFIX = list(range(5, 25))


def _requests():
    greedy = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    forked = SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=10, ignore_eos=True)
    prompts = [PREFIX + [30 + i] * (3 + 2 * i) for i in range(5)] + [list(range(40, 70))]
    return [({"prompt_token_ids": p}, forked if i == 2 else greedy) for i, p in enumerate(prompts)]


class Watched:
    """An engine whose executor calls are counted and whose scheduler outputs are kept."""

    def __init__(self, model_dir: str, **options):
        self.engine = LLMEngine(EngineConfig(model=model_dir, **{**OPTIONS, **options}))
        self.outputs = []
        self.slots = []  # per step: sample -> the cache slots its tokens are written to
        engine, executor = self.engine, self.engine.executor
        inner = executor.execute_model

        def execute_model(scheduler_output):
            self.outputs.append(scheduler_output)
            starts = {sid: engine.scheduler.requests[sid].num_computed_tokens for sid in scheduler_output.num_scheduled_tokens}
            self.slots.append({sample_key(sid): engine.kv.slot_mapping(sid, starts[sid], starts[sid] + n)
                               for sid, n in scheduler_output.num_scheduled_tokens.items()})
            return inner(scheduler_output)

        executor.execute_model = execute_model

    def run(self, after_step=None):
        for i, (prompt, params) in enumerate(_requests()):
            self.engine.add_request(str(i), prompt, params)
        finished = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    finished[out.request_id] = out
            if after_step is not None:
                after_step(self.engine)
        return finished


def _kv_truth(engine) -> dict:
    """The KV manager's state read from its own structures (not through the tracer)."""
    kv = engine.kv
    pool = kv._pool
    return {
        "tables": {sample_key(rid): [b.block_id for b in req.blocks] for rid, req in kv._requests.items()},
        "num_tokens": {sample_key(rid): req.num_tokens for rid, req in kv._requests.items()},
        "free": [b.block_id for b in pool._free],
        "cached": sorted(b.block_id for b in pool._blocks if b.block_hash is not None),
        "ref_cnt": [b.ref_cnt for b in pool._blocks],
    }


def test_one_record_per_step_consistent_with_the_engine(tiny_model_dir):
    w = Watched(tiny_model_dir, trace=True)
    finished = w.run()
    records, m = list(w.engine.tracer.records), w.engine.get_metrics()
    assert len(records) == len(w.outputs) > 0  # one record per step that ran the model
    assert [r["step"] for r in records] == list(range(len(records)))
    bs = OPTIONS["block_size"]
    for record, out, slots in zip(records, w.outputs, w.slots):
        jsonschema.validate(record, STEP_SCHEMA)
        for e in record["scheduled"]:  # the blocks written are those of the slots the runner writes
            assert e["blocks"] == list(dict.fromkeys(slot // bs for slot in slots[e["id"]]))
        assert {e["id"]: e["tokens"] for e in record["scheduled"]} == \
            {sample_key(sid): n for sid, n in out.num_scheduled_tokens.items()}
        assert [e["id"] for e in record["scheduled"]] == [sample_key(s) for s in out.num_scheduled_tokens]
        assert record["num_scheduled_tokens"] == out.total_num_scheduled_tokens <= OPTIONS["max_num_batched_tokens"]
        assert [p["id"] for p in record["preempted"]] == [sample_key(s) for s in out.preempted_req_ids]
        assert record["forked"] == [[sample_key(c.fork_of), sample_key(c.req_id)] for c in out.forked_reqs]
    tokens: dict[str, list[int]] = {}  # the sampled tokens, step by step, are each sample's output
    for record in records:
        for key, token in record["sampled"].items():
            tokens.setdefault(key, []).append(token)
    assert tokens == {f"{rid}#{c.index}": c.token_ids for rid, out in finished.items() for c in out.outputs}
    seen, waiting = set(), set()  # admitted: new, or taken from the waiting queue in this step
    for record in records:
        ids = [e["id"] for e in record["scheduled"]]
        assert [e["id"] for e in record["scheduled"] if e["admitted"]] == \
            [i for i in ids if i in waiting or i not in seen]
        seen |= set(ids) | {child for _, child in record["forked"]}
        waiting = set(record["waiting"])
        pc, rate = record["prefix_cache"], record["block_reuse_rate"]["step"]
        placed = pc["blocks_reused"] + pc["blocks_allocated"]
        assert rate == (pc["blocks_reused"] / placed if placed else None)
    last = records[-1]["totals"]
    assert last["generated_tokens"] == m.num_generated_tokens == sum(len(r["sampled"]) for r in records)
    assert last["preemptions"] == m.num_preemptions == sum(len(r["preempted"]) for r in records) > 0
    assert last["prompt_tokens_computed"] == m.num_prompt_tokens_computed
    assert last["prefix_cache_hit_rate"] == m.prefix_cache_hit_rate > 0
    stats = w.engine.kv.stats
    assert sum(r["prefix_cache"]["hits"] for r in records) == stats.hits == last["prefix_hit_tokens"]
    reused = sum(r["prefix_cache"]["blocks_reused"] for r in records)
    placed = reused + sum(r["prefix_cache"]["blocks_allocated"] for r in records)
    assert reused > 0 and records[-1]["block_reuse_rate"]["cumulative"] == pytest.approx(reused / placed)
    assert any(r["forked"] for r in records)
    assert any(e["kind"] == "prefill" and not e["samples"] for r in records for e in r["scheduled"])  # a chunk
    assert any(e["admitted"] and e["prefix_hit_tokens"] > 0 for r in records for e in r["scheduled"])
    assert any(e["kind"] == "recompute" for r in records for e in r["scheduled"])


def test_block_map_matches_the_kv_cache_manager_at_every_step(tiny_model_dir):
    truths = []
    w = Watched(tiny_model_dir, trace=True)
    w.run(after_step=lambda engine: truths.append(_kv_truth(engine)))
    records = list(w.engine.tracer.records)
    assert len(records) == len(truths)  # every step() of this run ran the model
    tables: dict[str, list[int]] = {}
    for record, truth in zip(records, truths):
        kv = record["kv"]
        assert kv["tables"] == truth["tables"]
        assert kv["num_tokens"] == truth["num_tokens"]
        assert kv["free"] == truth["free"] and kv["num_free"] == len(truth["free"])
        assert kv["cached"] == truth["cached"]
        owners = [0] * len(truth["ref_cnt"])  # the map drawn from the record: owners per block
        for table in kv["tables"].values():
            for b in table:
                owners[b] += 1
        assert owners == truth["ref_cnt"]
        assert {b for b, n in enumerate(owners) if n == 0} == set(kv["free"])
        assert kv["usage"] == pytest.approx(1 - len(kv["free"]) / len(owners))
        for key, change in record["block_changes"].items():  # replaying the changes gives the tables
            if "freed" in change:
                assert tables.pop(key) == change["freed"]
            else:
                tables[key] = tables.get(key, []) + change["added"]
        assert tables == kv["tables"]


def test_queues_and_preemptions_are_the_schedulers(tiny_model_dir):
    w = Watched(tiny_model_dir, trace=True)
    queues = []
    w.run(after_step=lambda e: queues.append(([sample_key(r.request_id) for r in e.scheduler.waiting],
                                              [sample_key(r.request_id) for r in e.scheduler.running])))
    records = list(w.engine.tracer.records)
    for record, (waiting, running) in zip(records, queues):
        assert (record["waiting"], record["running"]) == (waiting, running)
    for prev, record in zip(records, records[1:]):
        for p in record["preempted"]:
            # fcfs: the victim is the latest admitted of those running before the step, and it
            # was preempted for a request that was running too; it waits at the queue's head
            assert p["needed_by"] in prev["running"] and p["id"] in prev["running"]
            assert p["id"] == [r for r in prev["running"] if r not in _victims_before(record, p)][-1]
            assert p["id"] in record["waiting"][:len(record["preempted"])]
            assert p["needed_by"] in p["reason"] and "fcfs" in p["reason"]


def _victims_before(record, p) -> list[str]:
    ids = [q["id"] for q in record["preempted"]]
    return ids[:ids.index(p["id"])]


def test_tracing_changes_no_output(tiny_model_dir, tmp_path):
    plain = Watched(tiny_model_dir).run()
    path = tmp_path / "trace.jsonl"
    traced_engine = Watched(tiny_model_dir, trace=str(path))
    traced = traced_engine.run()
    assert plain.keys() == traced.keys()
    for rid in plain:
        assert [c.token_ids for c in plain[rid].outputs] == [c.token_ids for c in traced[rid].outputs]
        assert [c.text for c in plain[rid].outputs] == [c.text for c in traced[rid].outputs]
    traced_engine.engine.shutdown()
    meta, steps = read_trace(path)  # the file holds what memory holds
    jsonschema.validate(meta, META_SCHEMA)
    assert steps == json.loads(json.dumps(list(traced_engine.engine.tracer.records)))
    assert meta["layers_timed"] and all(r["layers_ms"]["model_forward"] > 0 for r in steps)


def test_e2e_conformance_passes_with_tracing_on(tiny_model_dir):
    from conformance.adapters import FastAdapter
    from conformance.runner import run_check
    from conformance.tiers import CHECKS, MAX_MODEL_LEN, Context, Profile

    engines = []

    class TracedFast(FastAdapter):  # still named "fast": the tier drives its engines step by step
        def make_engine(self, **options):
            engines.append(super().make_engine(**options))
            return engines[-1]

    def make(model_dir, **options):
        return TracedFast(model_dir, trace=True, **options)

    profile = Profile("traced", examples=10, max_requests=8, stateful_steps=20, families=False, kernel_max_seq_len=64)
    check = next(c for c in CHECKS if c.tier == "e2e" and c.name == "workloads_vs_oracle")
    ctx = Context(adapter=make(tiny_model_dir, max_model_len=MAX_MODEL_LEN), model_dir=tiny_model_dir,
                  profile=profile, make_adapter=make)
    result = run_check(check, ctx, seed=1234, shrink=False, replay="")
    assert result.status == "passed", result.message
    assert len(engines) >= 10 and all(e.tracer.records for e in engines)  # the compared engines traced


def test_tracing_off_installs_nothing(tiny_model_dir):
    engine = LLMEngine(EngineConfig(model=tiny_model_dir, **OPTIONS))
    assert engine.tracer is None
    runner = engine.executor.driver_worker.model_runner
    for obj in (engine, engine.kv, engine.scheduler, runner, runner.model, runner.backend):
        assert not any(callable(v) and getattr(v, "__name__", "") == "timed" for v in vars(obj).values())


def test_worker_in_another_process_is_traced_without_layers(tiny_model_dir):
    llm = LLM(tiny_model_dir, trace=True, distributed_executor_backend="mp", **OPTIONS)
    try:
        llm.generate([{"prompt_token_ids": PREFIX}], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        records = list(llm.llm_engine.tracer.records)
    finally:
        llm.shutdown()
    assert len(records) == 4 and all(r["layers_ms"] is None for r in records)
    assert llm.llm_engine.tracer.meta["layers_timed"] is False


@pytest.mark.parametrize("bad", [0, 1, "", None, ["a"]])
def test_trace_option_is_validated(tiny_model_dir, bad):
    with pytest.raises(ValueError, match="trace must be"):
        EngineConfig(model=tiny_model_dir, trace=bad)


def test_server_traces_to_a_file_with_its_trace_flag(tiny_model_dir, tmp_path):
    from starlette.testclient import TestClient

    from fast.entrypoints.openai_server import build_app, parse_args

    path = tmp_path / "server.jsonl"
    options = {k: v for k, v in vars(parse_args(["--trace", str(path), "--max-model-len", "64"])).items()
               if k not in ("model", "served_model_name", "host", "port", "log_level")}
    engine = LLMEngine(EngineConfig.from_options(tiny_model_dir, options))
    with TestClient(build_app(engine, "m")) as client:
        reply = client.post("/v1/completions", json={"model": "m", "prompt": [5, 6, 7], "max_tokens": 3})
        assert reply.status_code == 200, reply.text
    engine.shutdown()
    meta, steps = read_trace(path)
    assert meta["engine"] == "fast" and sum(len(s["sampled"]) for s in steps) == 3
    assert engine.tracer.records.maxlen == 100  # a file keeps every step; memory only the latest


@st.composite
def _traced_runs(draw):
    """Random small workloads: shared prefixes, n > 1, tiny pools (preemption), aborts between steps."""
    prefix = draw(st.lists(st.integers(3, 500), min_size=0, max_size=12))
    requests = []
    for i in range(draw(st.integers(2, 6))):
        prompt = prefix + draw(st.lists(st.integers(3, 500), min_size=1, max_size=20))
        n = draw(st.integers(1, 3))
        params = SamplingParams(temperature=1.0 if n > 1 else draw(st.sampled_from([0.0, 1.0])), seed=i, n=n,
                                max_tokens=draw(st.integers(1, 12)), ignore_eos=True)
        requests.append((prompt, params, draw(st.none() | st.integers(0, 12))))  # abort before that step
    options = dict(max_model_len=48, block_size=draw(st.sampled_from([2, 4, 8])), max_num_seqs=draw(st.integers(2, 6)),
                   max_num_batched_tokens=draw(st.sampled_from([8, 16, 48])), policy=draw(st.sampled_from(["fcfs", "priority"])),
                   enable_prefix_caching=draw(st.booleans()))
    options["num_kv_blocks"] = 48 // options["block_size"] + draw(st.sampled_from([0, 1, 2, 12]))  # mostly tight
    return requests, options


@settings(max_examples=15)
@given(run=_traced_runs())
def test_block_map_and_totals_hold_on_random_runs(tiny_model_dir, run):
    requests, options = run
    engine = LLMEngine(EngineConfig(model=tiny_model_dir, trace=True, **options))
    for i, (prompt, params, _) in enumerate(requests):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params, priority=i % 3)
    steps = 0
    while engine.has_unfinished_requests():
        for i, (_, _, abort_at) in enumerate(requests):
            if abort_at == steps:
                engine.abort_request(str(i))
        before = len(engine.tracer.records)
        engine.step()
        steps += 1
        records = engine.tracer.records
        if len(records) == before:
            continue
        record, truth = records[-1], _kv_truth(engine)
        assert len(records) == before + 1
        assert {k: record["kv"][k] for k in ("tables", "num_tokens", "free", "cached")} == \
            {k: truth[k] for k in ("tables", "num_tokens", "free", "cached")}
        m = engine.get_metrics()
        assert (record["totals"]["generated_tokens"], record["totals"]["preemptions"]) == \
            (m.num_generated_tokens, m.num_preemptions)
        assert record["waiting"] == [sample_key(r.request_id) for r in engine.scheduler.waiting]
    assert _kv_truth(engine)["tables"] == {}  # (aborts after the last step leave no record)
