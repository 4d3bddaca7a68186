"""The `ray` executor: TP=2 on Ray actors equals TP=1 under the SPEC comparison rule; a killed or
raising actor is a WorkerDiedError within seconds, never a hang; Ray leaves no process behind.

One local Ray instance (`ray.init(num_cpus=2)`) serves the module, and one TP=2 engine, whose
last use is the kill. Every check that needs Ray lives in one test, so that pytest-xdist cannot
split them over two workers (each would start its own Ray).
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import sys
import time

import pytest

from conformance.compare import check_request_outputs
from fast import LLM
from fast.config import EngineConfig
from fast.executor import WorkerDiedError
from ref.sampling_params import SamplingParams

MAX_MODEL_LEN = 128
# Small pools and budgets, so that the TP=2 run chunks prompts, forks samples and preempts.
ENGINE_OPTIONS = dict(max_model_len=MAX_MODEL_LEN, block_size=8, num_kv_blocks=24, max_num_seqs=6,
                      max_num_batched_tokens=40, attention_backend="torch", seed=3)
DIED_WITHIN_S = 10.0


def _ray_processes() -> dict[int, str]:
    """pid -> command line of this process's descendants that belong to Ray (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    found, frontier = {}, {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
        for pid in frontier:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "ray" in cmd:
                found[pid] = cmd
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray", reason="ray is not installed (the extra: pip install -e '.[ray]')")
    if sys.platform != "linux":
        pytest.skip("the leftover-process check reads /proc")
    saved_address = os.environ.pop("RAY_ADDRESS", None)  # a local instance, never someone's cluster
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        processes = _ray_processes()  # Ray's own and every actor's, before Ray goes
        ray.shutdown()
        if saved_address is not None:
            os.environ["RAY_ADDRESS"] = saved_address
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in processes) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {pid: cmd[:120] for pid, cmd in processes.items() if _alive(pid)}
        assert processes, "found no Ray process to check"
        assert not left, f"Ray processes outlived ray.shutdown(): {left}"


def _workload(vocab: int) -> tuple[list[dict], list[SamplingParams]]:
    rng = random.Random(1234)
    prefix = [rng.randrange(3, vocab) for _ in range(20)]
    prompts, params = [], []
    for i, p in enumerate([
        SamplingParams(temperature=0.0, max_tokens=12, prompt_logprobs=3, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=20, logprobs=3),
        SamplingParams(temperature=0.9, seed=11, max_tokens=16, n=3, logprobs=1),
        SamplingParams(temperature=0.7, seed=5, top_k=40, top_p=0.9, max_tokens=16, n=2, prompt_logprobs=1),
        SamplingParams(temperature=1.2, seed=99, min_p=0.05, presence_penalty=0.5, max_tokens=16),
        SamplingParams(temperature=0.0, max_tokens=20, repetition_penalty=1.3),
        SamplingParams(temperature=0.8, seed=2024, max_tokens=10, n=4),
    ]):
        tail = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 50))]
        prompts.append({"prompt_token_ids": (prefix if i % 2 else []) + tail})
        params.append(p)
    return prompts, params


class _DriverLogits:
    """The TP=1 engine as the comparison's model: its teacher-forced logits."""

    def __init__(self, llm: LLM):
        self.llm = llm

    def teacher_forced_logits(self, token_ids: list[int]):
        return self.llm.llm_engine.executor.driver_call("teacher_forced_logits", (token_ids,))


def test_ray_executor(ray_instance, tiny_model_dir):
    """Raising ranks at start-up; check_health of a one-rank executor sees its actor killed; then
    TP=2 == TP=1 on one engine, and that engine's rank killed."""
    ray = ray_instance
    _check_raising_workers_at_start(tiny_model_dir)
    _check_health_sees_a_killed_actor(tiny_model_dir)
    tp1 = LLM(tiny_model_dir, **ENGINE_OPTIONS)
    tp2 = LLM(tiny_model_dir, tensor_parallel_size=2, distributed_executor_backend="ray", **ENGINE_OPTIONS)
    try:
        executor = tp2.llm_engine.executor
        assert type(executor).__name__ == "RayExecutor" and len(executor.actors) == 2

        prompts, params = _workload(tp1.llm_engine.resolved.model.hf.vocab_size)
        expected = tp1.generate(prompts, params, use_tqdm=False)
        got = tp2.generate(prompts, params, use_tqdm=False)
        check_request_outputs(_DriverLogits(tp1), tp1.llm_engine.resolved.model.hf.eos_token_ids,
                              [(p["prompt_token_ids"], sp) for p, sp in zip(prompts, params)], expected, got)
        assert tp2.llm_engine.kv.num_free_blocks == tp2.llm_engine.num_blocks, "blocks leaked"
        assert tp2.llm_engine.get_metrics().num_preemptions > 0, "the workload no longer preempts"
        executor.check_health()

        # A rank's process killed (as by the OOM killer) between steps: the next step fails fast.
        os.kill(executor.worker_pids[1], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match="worker 1 .*died during execute_model"):
            tp2.generate(prompts[:2], params[:2], use_tqdm=False)
        assert time.monotonic() - start < DIED_WITHIN_S
        with pytest.raises(WorkerDiedError):  # dead from then on, at once
            executor.check_health()
        start = time.monotonic()
        while _alive(executor.worker_pids[0]) and time.monotonic() - start < DIED_WITHIN_S:
            time.sleep(0.1)
        assert not _alive(executor.worker_pids[0]), "the surviving rank was not killed"
    finally:
        tp2.shutdown()
        tp2.shutdown()  # idempotent
        tp1.shutdown()
    assert ray.is_initialized(), "the executor stopped a Ray instance it did not start"


def _check_raising_workers_at_start(tiny_model_dir: str) -> None:
    """Every rank's load_model raises: the RayTaskError is a WorkerDiedError with the traceback."""
    from fast.executor.ray_executor import RayExecutor

    config = EngineConfig(model=tiny_model_dir, tensor_parallel_size=2, distributed_executor_backend="ray",
                          max_model_len=MAX_MODEL_LEN).resolve()
    broken = dataclasses.replace(config, model=dataclasses.replace(config.model, path="/nonexistent/model"))
    start = time.monotonic()
    with pytest.raises(WorkerDiedError, match=r"(?s)worker \d .*raised during start-up.*nonexistent"):
        RayExecutor(broken)
    assert time.monotonic() - start < 60


def _check_health_sees_a_killed_actor(tiny_model_dir: str) -> None:
    """TP=1 on Ray (a one-rank process group): check_health, which never blocks, sees the kill."""
    from fast.executor.ray_executor import RayExecutor

    config = EngineConfig(model=tiny_model_dir, distributed_executor_backend="ray",
                          max_model_len=MAX_MODEL_LEN).resolve()
    executor = RayExecutor(config)
    try:
        assert executor.collective_rpc("ping") == [0]
        executor.check_health()
        os.kill(executor.worker_pids[0], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match="worker 0 .*died during check_health"):
            while time.monotonic() - start < DIED_WITHIN_S:
                call = time.monotonic()
                executor.check_health()
                assert time.monotonic() - call < 0.5, "check_health blocked"
                time.sleep(0.05)
        with pytest.raises(WorkerDiedError):
            executor.collective_rpc("ping")
    finally:
        executor.shutdown()


def test_missing_ray_names_the_extra(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[ray\]'"):
        LLM(tiny_model_dir, tensor_parallel_size=2, distributed_executor_backend="ray", max_model_len=MAX_MODEL_LEN)
