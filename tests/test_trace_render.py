"""The trace's pictures and texts (fast/trace/render.py), the workloads and `python -m fast.trace`.

The token path's slot is checked against the KV cache manager's own `slot_mapping` (fast) and
against ref's batch geometry (ref), read while the engine runs, not through the trace; the
summary's numbers against `get_metrics()` and numpy over the records.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fast.trace.render as render  # called through the module, so that a planted bug reaches the tests
from fast import LLM
from fast.trace import sample_key
from fast.trace.workloads import WORKLOADS, get_workload, replay
from tests.planting import plant

HAS_REF_OBSERVER = importlib.util.find_spec("fast.trace.ref_observer") is not None
needs_ref_observer = pytest.mark.skipif(not HAS_REF_OBSERVER, reason="fast/trace/ref_observer.py not there yet")
ROOT = Path(__file__).resolve().parents[1]
PNG_WIDTH = (1000, 1400)  # README width


@pytest.fixture(scope="module")
def model_dir() -> str:
    from ref.models import tiny_checkpoint

    return str(tiny_checkpoint())


class FastRun:
    """A workload run on fast with tracing on; after every step that made a record, the KV
    manager's slot of every position of every live sample (read from the manager itself)."""

    def __init__(self, model_dir: str, name: str):
        self.workload = get_workload(name)
        self.llm = LLM(model_dir, trace=True, **self.workload.options)
        self.engine = self.llm.llm_engine
        self.slots: list[dict[str, list[int]]] = []
        self.outputs: dict[str, list[list[int]]] = {}  # request id -> token ids of each sample
        replay(self.workload, self.engine, self._step)
        self.meta, self.steps = self.engine.tracer.meta, list(self.engine.tracer.records)
        self.metrics = self.engine.get_metrics()
        self.llm.shutdown()

    def _step(self):
        before = len(self.engine.tracer.records)
        outputs = self.engine.step()
        kv = self.engine.kv
        if len(self.engine.tracer.records) > before:
            self.slots.append({sample_key(rid): kv.slot_mapping(rid, 0, kv.get_num_tokens(rid))
                               for rid in kv.request_ids()})
        for out in outputs:
            if out.finished:
                self.outputs[out.request_id] = [list(o.token_ids) for o in out.outputs]
        return outputs


@pytest.fixture(scope="module")
def runs(model_dir):
    cache: dict[str, FastRun] = {}

    def get(name: str) -> FastRun:
        if name not in cache:
            cache[name] = FastRun(model_dir, name)
        return cache[name]

    return get


def check_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.stat().st_size > 10_000, f"{path.name}: {path.stat().st_size} bytes"
    image = imread(path)
    height, width, channels = image.shape
    assert PNG_WIDTH[0] <= width <= PNG_WIDTH[1] and 400 <= height <= 1500 and channels in (3, 4), image.shape
    colours = np.unique(image[..., :3].reshape(-1, 3).round(2), axis=0)
    assert len(colours) > 20, f"{path.name}: only {len(colours)} colours"


def check_token_slots(run: FastRun) -> int:
    """Every token of every sample: its token id is the engine's output, and the slot of its
    position in the step that feeds it is the KV manager's. Returns the slots checked."""
    made = render.sampled_tokens(run.steps)
    checked = 0
    for key, indices in made.items():
        rid, _, idx = key.rpartition("#")
        for index in indices:
            tp = render.find_token(run.meta, run.steps, key, index)
            assert tp.token_id == run.outputs[rid][int(idx)][index], f"{key} token {index}: id {tp.token_id}"
            if index < max(indices):
                assert tp.fed_col is not None, f"{key} token {index} (not its last) is never fed back"
            truth = run.slots[tp.fed_col].get(key) if tp.fed_col is not None else None
            if truth is None:  # never fed back, or freed in that step: the manager holds no table
                continue
            assert tp.slot == truth[tp.position], (
                f"{run.workload.name}: {key} token {index} at position {tp.position}, fed at step {tp.fed_col}: "
                f"token path says slot {tp.slot}, KVCacheManager.slot_mapping says {truth[tp.position]}")
            checked += 1
    return checked


# ---------------------------------------------------------------------------------------- fast
@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_render_all_writes_valid_pictures_and_texts(runs, name, tmp_path):
    run = runs(name)
    files = render.render_all(run.meta, run.steps, tmp_path)
    assert sorted(files) == ["block_map", "summary", "timeline", "token_path"]
    check_png(files["timeline"])
    check_png(files["block_map"])
    assert "slot" in files["token_path"].read_text() and "steps: " in files["summary"].read_text()


def test_workloads_show_their_mechanism(runs):
    offline, shared, preempt, parallel = (runs(n) for n in ("offline", "shared-prefix", "preemption", "parallel"))
    assert any(not e["samples"] for rec in offline.steps for e in rec["scheduled"]), "no chunked prefill"
    assert offline.metrics.num_preemptions == 0
    assert shared.steps[-1]["block_reuse_rate"]["cumulative"] > 0.3
    assert preempt.metrics.num_preemptions >= 1
    assert sum(len(rec["forked"]) for rec in parallel.steps) == 6  # 3 requests x 2 forks
    assert any(len(set(t[0] for t in rec["kv"]["tables"].values())) < len(rec["kv"]["tables"])
               for rec in parallel.steps), "forks share their parent's first block"


@pytest.mark.parametrize("name", ["preemption", "parallel", "shared-prefix"])
def test_token_path_slot_is_the_kv_managers(runs, name):
    assert check_token_slots(runs(name)) >= 40


def test_planted_slot_off_by_one_is_caught(runs, monkeypatch):
    """Plant: the slot's offset in its block one too far."""
    plant(monkeypatch, "fast.trace.render", "block * bs + p % bs", "block * bs + (p + 1) % bs")
    with pytest.raises(AssertionError, match="KVCacheManager.slot_mapping says"):
        check_token_slots(runs("parallel"))


@pytest.mark.parametrize("name", ["parallel", "preemption"])
def test_block_map_fill_is_the_kv_managers(runs, name):
    """Each block's owner count and written slots, as the block map draws them, against the
    distinct slots the KV manager maps the live samples' positions to."""
    run = runs(name)
    bs = run.meta["block_size"]
    for col, rec in enumerate(run.steps):
        truth: dict[int, set[int]] = {}
        holders: dict[int, set[str]] = {}
        for key, slots in run.slots[col].items():
            for slot in slots:
                truth.setdefault(slot // bs, set()).add(slot)
                holders.setdefault(slot // bs, set()).add(key)
        drawn = render.block_states(rec, bs)
        assert {b: s.used for b, s in drawn.items() if s.used} == {b: len(s) for b, s in truth.items()}, f"step {col}"
        assert all(drawn[b].num_owners >= len(keys) for b, keys in holders.items())


def test_token_path_text_names_the_steps_and_timings(runs):
    run = runs("preemption")
    tp = render.find_token(run.meta, run.steps)
    assert tp.index == 2 and tp.fed_col is not None
    text = render.token_path(run.meta, run.steps, token_text=lambda t: f"<{t}>")
    rec, fed = run.steps[tp.sampled_col], run.steps[tp.fed_col]
    assert text.startswith(f"token 2 of request {tp.sample.split('#')[0]} (sample {tp.sample}): id {tp.token_id} '<{tp.token_id}>'")
    assert f"[sampled at step {rec['step']}, its KV written at step {fed['step']}]" in text
    assert f"{rec['duration_ms']:.3f} ms" in text and f"{rec['layers_ms']['sampler']:.3f} ms" in text
    assert f"-> token {tp.token_id}" in text and "shared by all" in text
    bs = run.meta["block_size"]
    assert text.rstrip().splitlines()[-2] == (
        f"step {fed['step']}: the token is the input at position {tp.position} -> block {tp.block}, "
        f"slot {tp.block}*{bs}+{tp.position % bs} = {tp.slot}")
    untimed = [{**r, "layers_ms": None} for r in run.steps]
    assert "worker in another process: inner layers not timed" in render.token_path(run.meta, untimed)


def test_token_path_of_a_fork_and_bad_requests(runs):
    run = runs("parallel")
    tp = render.find_token(run.meta, run.steps, "1#2", 0)
    rec = run.steps[tp.sampled_col]
    assert ["1#0", "1#2"] in rec["forked"]
    assert "forked from 1#0" in render.token_path(run.meta, run.steps, "1#2", 0)
    with pytest.raises(ValueError, match="sample 9#0 produced no token"):
        render.find_token(run.meta, run.steps, "9")
    with pytest.raises(ValueError, match="token 99 of sample 1#0 is not in the trace"):
        render.find_token(run.meta, run.steps, "1", 99)


def test_summary_numbers_are_the_engines(runs):
    run = runs("preemption")
    s, m, steps = render.trace_stats(run.meta, run.steps), run.metrics, run.steps
    assert (s.generated_tokens, s.prompt_tokens_computed, s.preemptions) == (
        m.num_generated_tokens, m.num_prompt_tokens_computed, m.num_preemptions)
    assert s.prefix_cache_hit_rate == m.prefix_cache_hit_rate
    assert s.block_reuse_rate == run.engine.kv.stats.block_reuse_rate
    assert s.num_steps == len(steps) and s.num_samples == len(run.workload.prompts)
    usage = np.array([r["kv"]["usage"] for r in steps])
    durations = np.array([r["duration_ms"] for r in steps])
    assert s.kv_usage_mean == pytest.approx(usage.mean()) and s.kv_usage_max == usage.max()
    assert s.step_ms_p50 == pytest.approx(np.percentile(durations, 50))
    assert s.step_ms_p90 == pytest.approx(np.percentile(durations, 90))
    assert s.max_batch == max(len(r["scheduled"]) for r in steps)
    assert sum(s.victims.values()) == m.num_preemptions
    assert sum(s.phase_share.values()) == pytest.approx(1.0, abs=0.01)
    text = render.summary(run.meta, steps)
    assert f"{m.num_prompt_tokens_computed} prompt tokens computed, {m.num_generated_tokens} generated" in text
    assert f"preemptions: {m.num_preemptions} (victims: " in text
    assert f"p50 {np.percentile(durations, 50):.3f} ms" in text


def test_timeline_states_follow_the_records(runs):
    run = runs("preemption")
    tl = render.timeline(run.steps)
    assert tl.samples == render.sample_order(run.steps) == [f"{i}#0" for i in range(6)]
    row = {k: i for i, k in enumerate(tl.samples)}
    for col, rec in enumerate(run.steps):
        for e in rec["scheduled"]:
            want = "decode" if e["kind"] == "decode" else e["kind"] + ("_last" if e["samples"] else "")
            assert tl.states[row[e["id"]]][col] == want
        for key in rec["waiting"]:
            assert tl.states[row[key]][col] == "waiting"
    assert len(tl.preempted) == run.metrics.num_preemptions and len(tl.finished) == 6
    assert any(s == "recompute_last" for states in tl.states for s in states)


# ---------------------------------------------------------------------------------------- ref
@needs_ref_observer
def test_ref_trace_renders_and_its_slots_are_the_rows(model_dir, tmp_path):
    """ref: the token's slot is row b's: b * R * block_size + position, R = ceil(cache.max_len /
    block_size), read from the engine's batch while it runs."""
    from fast.trace.__main__ import plan_ref_batch
    from fast.trace.ref_observer import RefObserver
    from ref.engine import EngineConfig, LLMEngine

    workload = get_workload("shared-prefix")
    options = workload.options
    plan = plan_ref_batch(workload, options)
    engine = LLMEngine(EngineConfig(model=model_dir, max_model_len=options["max_model_len"], max_batch=plan.max_batch))
    observer = RefObserver(engine, options["num_kv_blocks"], options["block_size"])
    geometry = []  # per record: sample -> (row, cache.max_len)

    def step():
        before = len(observer.records)
        outputs = observer.step()
        if len(observer.records) > before:
            geometry.append({f"{req.request_id}#{seq.index}": (b, engine.batch.cache.max_len)
                             for b, (req, seq) in enumerate(engine.batch.rows)})
        return outputs

    replay(workload, engine, step)
    meta, steps, bs = observer.meta, list(observer.records), options["block_size"]
    checked = 0
    for key, indices in render.sampled_tokens(steps).items():
        for index in indices:
            tp = render.find_token(meta, steps, key, index)
            if tp.fed_col is None:
                continue
            row, max_len = geometry[tp.fed_col][key]
            assert tp.slot == row * math.ceil(max_len / bs) * bs + tp.position, (key, index, tp)
            checked += 1
    assert checked >= 40
    files = render.render_all(meta, steps, tmp_path)
    check_png(files["timeline"])
    check_png(files["block_map"])
    text = render.token_path(meta, steps)
    assert "contiguous cache row" in text and "of the static batch" in text
    s = render.trace_stats(meta, steps)
    assert s.kv_utilization == pytest.approx(engine.get_metrics().kv_utilization)
    assert s.block_reuse_rate is None and "block reuse rate (cumulative): n/a" in render.summary(meta, steps)


# ---------------------------------------------------------------------------------------- CLI
def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fast.trace", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


FILES = ["block_map.png", "summary.txt", "timeline.png", "token_path.txt", "trace.jsonl"]


def test_cli_fast_end_to_end(tmp_path):
    done = _cli("--workload", "parallel", "--out", str(tmp_path), "--request", "1", "--token", "3")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == FILES
    assert all((tmp_path / f).stat().st_size > 0 for f in FILES)
    assert "random weights, so its output is gibberish" in done.stdout
    assert "token 3 of request 1 (sample 1#0)" in done.stdout and "files:" in done.stdout
    assert "steps: " in (tmp_path / "summary.txt").read_text()


@needs_ref_observer
def test_cli_ref_end_to_end(tmp_path):
    done = _cli("--engine", "ref", "--workload", "parallel", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == FILES
    assert re.search(r"ref: KV budget 192 slots; a row reserves up to 8 blocks of 4 .* so 6 rows fit", done.stdout)
    assert "contiguous cache row" in done.stdout


@pytest.mark.parametrize("args, flag", [
    (["--block-size", "0"], "--block-size"),
    (["--max-num-seqs", "x"], "--max-num-seqs"),
    (["--workload", "nope"], "--workload"),
    (["--engine", "vllm"], "--engine"),
    (["--token", "-1"], "--token"),
])
def test_cli_errors_name_the_flag(args, flag, tmp_path, capsys):
    from fast.trace.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path), *args])
    assert exc.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_cli_unknown_request_names_the_flag(tmp_path, capsys):
    from fast.trace.__main__ import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--workload", "parallel", "--request", "7"])
    assert "argument --request/--token: request '7'" in capsys.readouterr().err
