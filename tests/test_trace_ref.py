"""The reference engine's step trace (`fast.trace.ref_observer.RefObserver`): schema, one record
per forward pass, outputs unchanged, and the reservation it draws equal to ref's own accounting."""

from __future__ import annotations

import math

import jsonschema
import pytest

from fast.trace import read_trace
from fast.trace.ref_observer import RefObserver
from fast.trace.schema import META_SCHEMA, STEP_SCHEMA
from ref import EngineConfig, LLMEngine, SamplingParams
from tests.planting import plant

BLOCK_SIZE = 8
NUM_BLOCKS = 64  # 4 rows x ceil(64 / 8) blocks: any batch of this config fits
MAX_BATCH = 4

# Prompts of different lengths (padding), max_tokens that finish rows at different steps (finished
# rows keep their reservation), n > 1 (one row per sample), more samples than max_batch (batches).
WORKLOAD = [
    ("a", [5, 6, 7, 8, 9, 10, 11], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)),
    ("b", [12, 13, 14], SamplingParams(temperature=0.8, seed=7, n=2, max_tokens=6, ignore_eos=True)),
    ("c", list(range(20, 40)), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)),
    ("d", [41, 42, 43, 44], SamplingParams(temperature=1.0, max_tokens=5)),  # unseeded; may stop at EOS
    ("e", [50, 51], SamplingParams(temperature=0.7, seed=3, n=3, max_tokens=4, ignore_eos=True)),
    ("f", list(range(60, 110)), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)),  # hits max_model_len
]


@pytest.fixture(scope="module")
def model_dir():
    from ref.models import tiny_checkpoint

    return str(tiny_checkpoint())


def make_engine(model_dir: str, max_batch: int = MAX_BATCH) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model=model_dir, max_model_len=64, max_batch=max_batch))
    for rid, prompt, params in WORKLOAD:
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    return engine


def final_outputs(outputs_by_step) -> dict:
    """request id -> [(token_ids, finish_reason, text)] of its finished output."""
    done = {}
    for outputs in outputs_by_step:
        for out in outputs:
            if out.finished:
                done[out.request_id] = [(o.token_ids, o.finish_reason, o.text) for o in out.outputs]
    return done


def check_record(record: dict, engine: LLMEngine, block_size: int, num_blocks: int) -> None:
    """The record of the step just run against `engine.batch`, recomputed from ref's own state."""
    batch = engine.batch
    rows = [(f"{req.request_id}#{seq.index}", req, seq) for req, seq in batch.rows]
    kv = record["kv"]
    assert list(kv["tables"]) == [key for key, _, _ in rows], "every row (finished too) holds its table"
    reserved_slots = len(rows) * batch.cache.max_len  # what _account_kv counts as reserved
    table_slots = sum(len(t) for t in kv["tables"].values()) * block_size
    assert reserved_slots <= table_slots < reserved_slots + len(rows) * block_size, (reserved_slots, table_slots)
    used = sum(len(req.prompt_token_ids) + len(seq.output_ids) - 1 for _, req, seq in rows if not seq.finished)
    live = sum(kv["num_tokens"].values())
    assert live == used, f"step {record['step']}: num_tokens {kv['num_tokens']} sum to {live}, _account_kv counts {used}"
    for key, req, seq in rows:
        expected = 0 if seq.finished else len(req.prompt_token_ids) + len(seq.output_ids) - 1
        got = kv["num_tokens"][key]
        assert got == expected, f"step {record['step']}: num_tokens[{key}] is {got}, ref's state says {expected}"
    blocks = [b for t in kv["tables"].values() for b in t]
    assert sorted(blocks + kv["free"]) == list(range(num_blocks)), "tables and free list partition the pool"
    assert kv["num_free"] == len(kv["free"]) and kv["usage"] == len(blocks) / num_blocks
    assert record["running"] == [key for key, _, seq in rows if not seq.finished]
    assert record["waiting"] == [f"{r.request_id}#{s.index}" for r in engine.waiting for s in r.seqs]
    m = engine.get_metrics()
    assert record["totals"]["kv_slot_steps_reserved"] == m.kv_slot_steps_reserved
    assert record["totals"]["kv_slot_steps_used"] == m.kv_slot_steps_used


def observed_run(model_dir: str, path=None, block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS):
    """Run WORKLOAD through a RefObserver, checking each record; (engine, observer, outputs, forwards)."""
    engine = make_engine(model_dir)
    forwards = []
    engine.model.register_forward_hook(lambda *_: forwards.append(1))  # counts forward passes, changes nothing
    obs = RefObserver(engine, num_blocks=num_blocks, block_size=block_size, path=path)
    outputs = []
    while engine.has_unfinished_requests():
        n = len(obs.records)
        outputs.append(obs.step())
        assert len(obs.records) == n + 1, "a step with requests left runs the model"
        check_record(obs.records[-1], engine, block_size, num_blocks)
    for _ in range(2):  # nothing left: no batch, no forward pass, no record
        assert obs.step() == []
    obs.close()
    return engine, obs, outputs, len(forwards)


@pytest.fixture(scope="module")
def run(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "ref.jsonl"
    return (*observed_run(model_dir, path=str(path)), path)


def test_records_validate_and_read_back(run):
    engine, obs, _, _, path = run
    jsonschema.validate(obs.meta, META_SCHEMA)
    for record in obs.records:
        jsonschema.validate(record, STEP_SCHEMA)
    meta, steps = read_trace(path)
    assert meta == obs.meta and steps == list(obs.records)
    assert meta["engine"] == "ref" and meta["max_num_seqs"] == MAX_BATCH and meta["num_blocks"] == NUM_BLOCKS
    assert meta["layers_timed"] is False and meta["max_num_batched_tokens"] is None


def test_one_record_per_forward_pass_and_outputs_unchanged(run, model_dir):
    engine, obs, outputs, forwards, _ = run
    assert len(obs.records) == forwards > 0
    assert [r["step"] for r in obs.records] == list(range(forwards))
    plain = make_engine(model_dir)
    plain_outputs = []
    while plain.has_unfinished_requests():
        plain_outputs.append(plain.step())
    assert final_outputs(outputs) == final_outputs(plain_outputs)
    assert set(final_outputs(outputs)) == {rid for rid, _, _ in WORKLOAD}


def test_steps_map_batches(run):
    """Prefill rows are whole new batches (padded count), decode rows the unfinished ones."""
    engine, obs, _, _, _ = run
    prompt_len = {f"{rid}#{i}": len(p) for rid, p, sp in WORKLOAD for i in range(sp.n)}
    running = []
    for record in obs.records:
        ids = [s["id"] for s in record["scheduled"]]
        kinds = {s["kind"] for s in record["scheduled"]}
        if kinds == {"prefill"}:
            assert not running, "ref forms a batch only when the previous one is done"
            assert len(ids) <= MAX_BATCH and all(s["admitted"] and s["start"] == 0 for s in record["scheduled"])
            assert [s["tokens"] for s in record["scheduled"]] == [prompt_len[i] for i in ids]
            assert record["num_scheduled_tokens"] == len(ids) * max(prompt_len[i] for i in ids)
            assert set(record["block_changes"]) >= set(ids)
        else:
            assert kinds == {"decode"} and ids == running
            assert all(s["tokens"] == 1 and not s["admitted"] for s in record["scheduled"])
            assert record["num_scheduled_tokens"] == len(record["kv"]["tables"])
        assert list(record["sampled"]) == ids
        finished = {f["id"] for f in record["finished"]}
        assert record["running"] == [i for i in ids if i not in finished]
        running = record["running"]
    ids = [s["id"] for r in obs.records for s in r["scheduled"]]
    assert {"b#0", "b#1", "e#0", "e#1", "e#2"} <= set(ids)


def test_finished_rows_keep_their_reservation(run):
    """A row finished early still holds its blocks (0 live tokens) until the next batch frees them."""
    _, obs, _, _, _ = run
    records = list(obs.records)
    held = [(r, key) for r in records for key in r["kv"]["tables"] if key not in r["running"]
            and r["running"]]  # finished while its batch still runs
    assert held, "the workload has a row that finishes before its batch"
    for record, key in held:
        assert record["kv"]["num_tokens"][key] == 0
    for before, after in zip(records, records[1:]):
        if after["scheduled"][0]["kind"] == "prefill":
            for key, table in before["kv"]["tables"].items():
                assert after["block_changes"][key] == {"freed": table}


def test_totals_match_ref(run):
    engine, obs, _, _, _ = run
    totals = obs.records[-1]["totals"]
    seqs = [(p, sp.n) for _, p, sp in WORKLOAD]
    assert totals["prompt_tokens_computed"] == sum(len(p) * n for p, n in seqs)  # once per row
    sampled = [t for r in obs.records for t in r["sampled"].values()]
    assert totals["generated_tokens"] == len(sampled) == sum(len(t) for o in final_outputs(run[2]).values()
                                                                for t, _, _ in o)
    assert totals["preemptions"] == 0
    m = engine.get_metrics()
    assert totals["kv_slot_steps_reserved"] == m.kv_slot_steps_reserved
    assert totals["kv_slot_steps_used"] == m.kv_slot_steps_used
    peak = max(sum(len(t) for t in r["kv"]["tables"].values()) for r in obs.records) * BLOCK_SIZE
    assert m.kv_slots_reserved_peak <= peak
    assert max(len(r["running"]) for r in obs.records) <= m.max_concurrent_seqs


def test_budget_overflow_raises_before_stepping(model_dir):
    engine = make_engine(model_dir)
    obs = RefObserver(engine, num_blocks=3, block_size=BLOCK_SIZE)
    with pytest.raises(ValueError, match="larger num_blocks"):
        obs.step()
    assert engine.batch is None and [r.request_id for r in engine.waiting] == [rid for rid, _, _ in WORKLOAD]
    assert not obs.records


def test_planted_num_tokens_off_by_one_is_caught(model_dir, monkeypatch):
    """Plant: live slots counted as prompt + outputs (the last sampled token's K/V is not written yet)."""
    plant(monkeypatch, "fast.trace.ref_observer", "len(req.prompt_token_ids) + len(seq.output_ids) - 1",
          "len(req.prompt_token_ids) + len(seq.output_ids)")
    with pytest.raises(AssertionError, match=r"step 0: num_tokens .* sum to 16, _account_kv counts 13"):
        observed_run(model_dir)


def test_block_geometry(model_dir):
    """Row b owns blocks [b*R, (b+1)*R), R = ceil(cache.max_len / block_size), for an odd block size."""
    engine = make_engine(model_dir)
    obs = RefObserver(engine, num_blocks=200, block_size=5)
    obs.step()
    check_record(obs.records[-1], engine, 5, 200)
    per_row = math.ceil(engine.batch.cache.max_len / 5)
    tables = list(obs.records[-1]["kv"]["tables"].values())
    assert tables == [list(range(b * per_row, (b + 1) * per_row)) for b in range(len(tables))]


def test_abort_mid_batch(model_dir):
    """An aborted row leaves `running` without a `finished` entry (it ended between steps) and keeps
    its reservation, with no live tokens, like any finished row."""
    engine = make_engine(model_dir)
    obs = RefObserver(engine, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    obs.step()
    engine.abort_request("b")
    obs.step()
    record = obs.records[-1]
    jsonschema.validate(record, STEP_SCHEMA)
    check_record(record, engine, BLOCK_SIZE, NUM_BLOCKS)
    assert "b#0" not in record["running"] and "b#0" not in [s["id"] for s in record["scheduled"]]
    assert record["kv"]["num_tokens"]["b#0"] == 0 and record["kv"]["tables"]["b#0"]
