"""Tensor parallelism end to end on CPU (gloo): `fast.LLM(model, tensor_parallel_size=2)` gives the
outputs of `tensor_parallel_size=1` under the SPEC comparison rule, and a failing worker process
is a clear `WorkerDiedError` within seconds, never a hang, nor a process left behind.

- Equivalence, per family (llama and qwen2 with their 2 KV heads split across the 2 ranks, mistral
  and qwen3 with 1 KV head, replicated on both): one workload with chunked prefill, preemption (a
  small KV pool), n > 1, seeded sampling with top-k/top-p/min-p and penalties, logprobs and
  prompt_logprobs; then prefix-cache hits. The TP=1 engine's outputs are the reference; the ref
  model arbitrates near-ties (`conformance.compare.check_request_outputs`).
- Failure: a worker SIGKILLed in the middle of `generate`; a worker that raises while its peer
  waits in a collective; the async engine (EngineDeadError for waiting requests) and the
  server's /health (503 once a worker died, even while idle); no worker left after `shutdown`,
  after the engine's interpreter exits without it, or after that interpreter is SIGKILLed.

The first TP=2 engine of a process costs seconds to start (multiprocessing's forkserver imports
torch once; later engines fork their workers from it in about a second), so the family engines
are module-scoped and serve several workloads; every engine is shut down by its fixture, which
also checks that its worker processes are gone. This process runs torch on one thread (see
`one_torch_thread`).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from conformance.compare import check_request_outputs, oracle_controls
from ref.sampling_params import StructuredOutputsParams
from fast import LLM, LLMEngine, SamplingParams
from fast.engine.async_llm_engine import AsyncLLMEngine, EngineDeadError
from fast.entrypoints.openai_server import build_app, serve_in_thread
from fast.executor import WorkerDiedError
from ref.config import ModelConfig
from ref.engine import EngineConfig as RefConfig, LLMEngine as RefEngine
from ref.model import load_model
from ref.models import tiny_checkpoint

# name -> (family, overrides of the tiny config: 4 q heads, 2 kv heads, vocab 512)
FAMILIES = {
    "llama": ("llama", {}),
    "mistral-1kv": ("mistral", dict(num_key_value_heads=1)),  # fewer KV heads than ranks
    "qwen2": ("qwen2", {}),  # q/k/v biases
    "qwen3-1kv": ("qwen3", dict(num_key_value_heads=1)),  # q/k norms, fewer KV heads than ranks
}
MAX_MODEL_LEN = 96
# A small pool (4 blocks over one full-length request) and a small token budget: prompts over 24
# tokens are chunked, and the running samples outgrow the pool (preemption).
OPTIONS = dict(max_model_len=MAX_MODEL_LEN, block_size=4, num_kv_blocks=28, max_num_seqs=6,
               max_num_batched_tokens=24, attention_backend="torch", seed=0)
FAILURE_OPTIONS = dict(max_model_len=512, block_size=16, num_kv_blocks=64, attention_backend="torch")
WAIT_S = 15.0  # bound on "within seconds" (the machine is small and busy)
STARTUP_S = 120.0  # bound on starting an engine in a subprocess


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The TP=1 engines run in this process: with torch's default threads (one per core), on a
    small busy machine, idle OpenMP threads spin against the workers and a step takes 10x longer.
    (The workers pick their own share of the CPUs.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------ helpers
def proc_stat(pid: int) -> tuple[str, str, int, int] | None:
    """(name, state, parent pid, start time) of a process, from /proc; None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, fields = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
    return name, fields[0], int(fields[1]), int(fields[19])


def live_workers(pids: list[int]) -> list[int]:
    """Those of `pids` that are still a live (not zombie) process named fast-worker-*."""
    alive = []
    for pid in pids:
        stat = proc_stat(pid)
        if stat is not None and stat[1] != "Z" and stat[0].startswith("fast-worker"):
            alive.append(pid)
    return alive


def descendants(root: int) -> dict[int, tuple[str, int]]:
    """Every live descendant of `root`: pid -> (name, start time)."""
    stats = {int(d): proc_stat(int(d)) for d in os.listdir("/proc") if d.isdigit()}
    children: dict[int, list[int]] = {}
    for pid, stat in stats.items():
        if stat is not None and stat[1] != "Z":
            children.setdefault(stat[2], []).append(pid)
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = (stats[child][0], stats[child][3])
            todo.append(child)
    return found


def still_alive(procs: dict[int, tuple[str, int]]) -> dict[int, str]:
    """Those of `procs` (pid -> (name, start time)) that still run (not zombies, not a reused pid)."""
    alive = {}
    for pid, (name, start) in procs.items():
        stat = proc_stat(pid)
        if stat is not None and stat[1] != "Z" and stat[3] == start:
            alive[pid] = name
    return alive


def assert_workers_gone(pids: list[int], within_s: float = WAIT_S, what: str = "") -> None:
    deadline = time.monotonic() + within_s
    while live_workers(pids):
        if time.monotonic() > deadline:
            pytest.fail(f"worker processes {live_workers(pids)} still alive {within_s:.0f} s {what}")
        time.sleep(0.05)


def shutdown_and_check(llm: LLM | LLMEngine) -> None:
    engine = llm.llm_engine if isinstance(llm, LLM) else llm
    pids = engine.executor.worker_pids
    llm.shutdown()
    assert_workers_gone(pids, what="after shutdown()")


def run_bounded(fn, timeout_s: float, on_timeout=None):
    """fn() in a thread; its result, or its exception re-raised; a test failure if it runs past
    `timeout_s` (after `on_timeout()`, which should unblock it)."""
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        if on_timeout is not None:
            on_timeout()
        pytest.fail(f"still running after {timeout_s:.0f} s: a hang")
    if "error" in box:
        raise box["error"]
    return box.get("result")


def kill_worker_when(engine: LLMEngine, rank: int, ready) -> threading.Thread:
    """SIGKILL worker `rank` from another thread as soon as `ready()`; the thread records when."""
    def target() -> None:
        deadline = time.monotonic() + 60
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(engine.executor.worker_pids[rank], signal.SIGKILL)
        thread.killed_at = time.monotonic()

    thread = threading.Thread(target=target, daemon=True)
    thread.killed_at = None
    thread.start()
    return thread


# ------------------------------------------------------------------------------ equivalence
def mixed_workload(vocab: int) -> list[tuple[dict, SamplingParams]]:
    """Requests that exercise chunked prefill (prompts > 24 tokens), preemption (28 blocks of 4
    cannot hold them all), n > 1 forks, seeded sampling with every filter and penalty, logprobs
    and prompt_logprobs, and a prefix shared within the batch."""
    g = random.Random(1234)
    tokens = lambda n: [g.randrange(3, vocab) for _ in range(n)]  # noqa: E731 - 0..2 are special
    shared = tokens(12)
    prompts = [shared + tokens(38), tokens(30), shared + tokens(5), tokens(6), tokens(45), shared + tokens(1),
               tokens(9)]
    params = [
        SamplingParams(temperature=0, max_tokens=24, logprobs=3, prompt_logprobs=2),
        SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=11, n=3, max_tokens=16, logprobs=2),
        SamplingParams(temperature=0.7, seed=5, max_tokens=28, repetition_penalty=1.3, presence_penalty=0.4,
                       frequency_penalty=0.2, prompt_logprobs=1),
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=1.0, min_p=0.05, seed=3, n=2, max_tokens=20, logprobs=0, prompt_logprobs=3),
        SamplingParams(temperature=1.2, seed=8, max_tokens=30, min_tokens=10, ignore_eos=True),
        SamplingParams(temperature=1.0, max_tokens=12),  # unseeded: only its shape is comparable
        # Structured output: every rank receives the step's grammar bitmask (it must pickle by value).
        SamplingParams(temperature=0.8, seed=2, n=2, max_tokens=10, logit_bias={5: 3.0},
                       structured_outputs=StructuredOutputsParams(regex="[ab]{1,4}c")),
    ]
    prompts.append(shared + tokens(3))
    return [({"prompt_token_ids": p}, sp) for p, sp in zip(prompts, params)]


def prefix_workload(vocab: int) -> list[tuple[dict, SamplingParams]]:
    """Prompts that share 16- and 9-token prefixes: run twice, the second run hits the cache."""
    g = random.Random(99)
    tokens = lambda n: [g.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    a, b = tokens(16), tokens(9)
    prompts = [a + tokens(3), a + tokens(10), b + tokens(7), a, b + tokens(2)]
    params = [SamplingParams(temperature=0, max_tokens=8, logprobs=1, prompt_logprobs=1),
              SamplingParams(temperature=0.8, seed=21, n=2, max_tokens=10),
              SamplingParams(temperature=0, max_tokens=12, prompt_logprobs=2),
              SamplingParams(temperature=0.6, top_k=5, seed=4, max_tokens=9, logprobs=4),
              SamplingParams(temperature=0, max_tokens=6)]
    return [({"prompt_token_ids": p}, sp) for p, sp in zip(prompts, params)]


class LazyRefModel:
    """The ref model, loaded only if a comparison needs it (a divergence or a logprob mismatch
    to arbitrate): identical outputs, the usual case, need no oracle logits."""

    def __init__(self, model_dir: str):
        self.model_dir, self._model = model_dir, None

    def teacher_forced_logits(self, token_ids: list[int]):
        if self._model is None:
            self._model = load_model(self.model_dir)
        return self._model.teacher_forced_logits(token_ids)


class Family:
    """One checkpoint with a TP=1 and a TP=2 engine on the same options, and the ref model that
    arbitrates near-ties."""

    def __init__(self, name: str, model_dir: str, tp1: LLM, tp2: LLM):
        self.name, self.model_dir, self.tp1, self.tp2 = name, model_dir, tp1, tp2
        config = ModelConfig.from_pretrained(model_dir)
        self.vocab, self.eos = config.vocab_size, config.eos_token_ids
        self.ref_model = LazyRefModel(model_dir)
        self._ref_engine = None

    def _oracle_controls(self, prompt_ids, params):
        """The oracle's grammar mask and bad words for a constrained request (a ref engine, loaded
        on first need like the model)."""
        if not params.bad_words and params.structured_outputs is None:
            return None
        if self._ref_engine is None:
            self._ref_engine = RefEngine(RefConfig.from_options(self.model_dir, {}))
        return oracle_controls(self._ref_engine)(prompt_ids, params)

    def check(self, requests: list[tuple[dict, SamplingParams]]) -> None:
        prompts, params = [p for p, _ in requests], [sp for _, sp in requests]
        expected = self.tp1.generate(prompts, params, use_tqdm=False)
        got = self.tp2.generate(prompts, params, use_tqdm=False)
        check_request_outputs(self.ref_model, self.eos, [(p["prompt_token_ids"], sp) for p, sp in requests],
                              expected, got, controls_for=self._oracle_controls)
        engine = self.tp2.llm_engine
        engine.kv.check_invariants()
        assert engine.kv.num_free_blocks == engine.num_blocks, "KV blocks leaked after the workload"


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    family_name, overrides = FAMILIES[request.param]
    model_dir = str(tiny_checkpoint(family_name, **overrides))
    tp1 = LLM(model_dir, **OPTIONS)
    if request.param == "llama":
        # Built in a thread that then ends: the workers must outlive it (they did not, when they
        # asked for PR_SET_PDEATHSIG, which fires when the *thread* that forked them exits).
        tp2 = run_bounded(lambda: LLM(model_dir, tensor_parallel_size=2, **OPTIONS), STARTUP_S)
    else:
        tp2 = LLM(model_dir, tensor_parallel_size=2, **OPTIONS)
    try:
        yield Family(request.param, model_dir, tp1, tp2)
    finally:
        shutdown_and_check(tp2)


def test_tp2_equals_tp1_chunked_preempted_sampled(family):
    requests = mixed_workload(family.vocab)
    before = family.tp2.llm_engine.get_metrics()
    family.check(requests)
    after = family.tp2.llm_engine.get_metrics()
    assert any(len(p["prompt_token_ids"]) > OPTIONS["max_num_batched_tokens"] for p, _ in requests), "no chunking"
    assert after.num_preemptions > before.num_preemptions, "the workload did not preempt: nothing was tested"
    alive = live_workers(family.tp2.llm_engine.executor.worker_pids)
    assert len(alive) == 2, f"expected 2 live workers, found {alive}"


def test_tp2_equals_tp1_with_prefix_cache_hits(family):
    requests = prefix_workload(family.vocab)
    kv = family.tp2.llm_engine.kv
    family.check(requests)
    hits = kv.stats.hits
    family.check(requests[::-1])  # every prompt again: its full blocks come from the cache
    assert kv.stats.hits > hits, "the second run hit no cached block"


# ------------------------------------------------------------------------------ failure
@pytest.fixture
def tp2_llm(tiny_model_dir):
    """A fresh TP=2 engine for a test that kills it; shut down (and checked) afterwards."""
    llm = LLM(tiny_model_dir, tensor_parallel_size=2, **FAILURE_OPTIONS)
    try:
        yield llm
    finally:
        shutdown_and_check(llm)


@pytest.fixture
def tp2_engine(tp2_llm):
    return tp2_llm.llm_engine


LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)


def test_worker_killed_mid_generate_is_worker_died_error(tp2_llm, tp2_engine):
    llm = tp2_llm
    killer = kill_worker_when(tp2_engine, 1, lambda: tp2_engine.scheduler.num_generated_tokens >= 4)
    prompts = [{"prompt_token_ids": [5 + i, 77, 301, 12]} for i in range(4)]
    with pytest.raises(WorkerDiedError, match=r"worker 1 \(pid \d+\) died during execute_model: killed by SIGKILL"):
        run_bounded(lambda: llm.generate(prompts, LONG, use_tqdm=False), 60,
                    on_timeout=tp2_engine.executor.shutdown)
    raised_at = time.monotonic()
    assert killer.killed_at is not None, "the worker was not killed: generate ended first"
    assert raised_at - killer.killed_at < WAIT_S, f"the error came {raised_at - killer.killed_at:.1f} s after the kill"
    assert_workers_gone(tp2_engine.executor.worker_pids, what="after a worker died")  # rank 0 killed too
    with pytest.raises(WorkerDiedError, match="worker 1"):  # dead from then on, at once
        run_bounded(lambda: llm.generate(prompts[:1], LONG, use_tqdm=False), WAIT_S)


def test_worker_that_raises_gives_its_traceback(tp2_engine):
    """Rank 1 raises while rank 0 waits for it in a collective (teacher-forced logits gather over
    the ranks): the error names rank 1 with its traceback, and rank 0 is not left blocked."""
    executor = tp2_engine.executor
    executor.pipes[0].send(("teacher_forced_logits", ([5, 77, 301],)))
    executor.pipes[1].send(("no_such_method", ()))
    t0 = time.monotonic()
    with pytest.raises(WorkerDiedError) as info:
        run_bounded(lambda: executor._gather("a planted call"), 60, on_timeout=executor.shutdown)
    assert time.monotonic() - t0 < WAIT_S
    message = str(info.value)
    assert "worker 1 (pid" in message and "raised during a planted call" in message, message
    assert "Traceback (most recent call last)" in message, message
    assert "AttributeError: 'Worker' object has no attribute 'no_such_method'" in message, message
    assert_workers_gone(executor.worker_pids, what="after a worker raised")
    with pytest.raises(WorkerDiedError, match="no_such_method"):
        executor.execute_model(None)


def test_async_engine_fails_waiting_requests_with_engine_dead_error(tp2_engine):
    aengine = AsyncLLMEngine(tp2_engine)

    async def main():
        outputs = aengine.generate({"prompt_token_ids": [5, 77, 301, 12]}, LONG, "r0")
        await outputs.__anext__()  # generating
        os.kill(tp2_engine.executor.worker_pids[1], signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises(EngineDeadError) as info:
            async for _ in outputs:
                pass
        assert time.monotonic() - killed_at < WAIT_S
        assert isinstance(info.value.__cause__, WorkerDiedError), info.value.__cause__
        assert "worker 1" in str(info.value), info.value
        assert not aengine.is_running
        with pytest.raises(EngineDeadError):  # new requests are refused
            async for _ in aengine.generate({"prompt_token_ids": [9, 9]}, LONG, "r1"):
                pass

    run_bounded(lambda: asyncio.run(main()), 60, on_timeout=tp2_engine.executor.shutdown)


def test_server_health_is_503_once_a_worker_died_while_idle(tp2_engine):
    with serve_in_thread(build_app(tp2_engine, "tiny")) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        os.kill(tp2_engine.executor.worker_pids[0], signal.SIGKILL)
        deadline = time.monotonic() + WAIT_S
        while (r := http.get("/health")).status_code == 200:
            assert time.monotonic() < deadline, "/health still 200 after a worker died"
            time.sleep(0.05)
        assert r.status_code == 503, r.text
        assert "worker 0" in r.json()["error"]["message"], r.text
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": [5, 77, 301], "max_tokens": 4})
        assert r.status_code == 503, r.text


# ------------------------------------------------------------------------------ the engine process ends
ENGINE_SCRIPT = """
import json, sys
from fast import LLM, SamplingParams
llm = LLM(sys.argv[1], tensor_parallel_size=2, max_model_len=64, block_size=4, num_kv_blocks=16)
llm.generate([{"prompt_token_ids": [5, 77, 301]}], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
print(json.dumps(llm.llm_engine.executor.worker_pids), flush=True)
sys.stdin.readline()
"""  # no shutdown(): on a line from the test it falls off the end, unless the test SIGKILLs it first


def _read_pids(proc: subprocess.Popen, deadline: float) -> list[int]:
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line:
                return json.loads(line)
            break  # EOF
    proc.kill()
    raise AssertionError(f"the engine process printed no worker pids (exit code {proc.wait()}): "
                         f"{proc.stderr.read()[-3000:]}")


def test_no_worker_outlives_its_engine_process(tiny_model_dir):
    """The engine's interpreter exits without shutdown(), or is SIGKILLed: every process it started
    (workers, the forkserver, multiprocessing's helpers) is gone within seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = {mode: subprocess.Popen([sys.executable, "-c", ENGINE_SCRIPT, tiny_model_dir], text=True, env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for mode in ("exit", "kill")}  # both at once: each imports torch twice (itself, its forkserver)
    try:
        deadline = time.monotonic() + STARTUP_S
        pids = {mode: _read_pids(proc, deadline) for mode, proc in procs.items()}
        started = {mode: descendants(proc.pid) for mode, proc in procs.items()}
        for mode in procs:
            assert len(live_workers(pids[mode])) == 2 and set(pids[mode]) <= set(started[mode]), (
                mode, pids[mode], started[mode])
        procs["exit"].stdin.write("\n")
        procs["exit"].stdin.flush()
        assert procs["exit"].wait(timeout=STARTUP_S) == 0, procs["exit"].stderr.read()[-3000:]
        procs["kill"].kill()
        procs["kill"].wait(timeout=WAIT_S)
        for mode, what in (("exit", "after the engine's interpreter exited without shutdown()"),
                           ("kill", "after the engine process was SIGKILLed")):
            assert_workers_gone(pids[mode], what=what)
            deadline = time.monotonic() + WAIT_S
            while still_alive(started[mode]):
                assert time.monotonic() < deadline, f"{what}: still running: {still_alive(started[mode])}"
                time.sleep(0.05)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()
