"""Run a workload through an engine's `LLMEngine` API step by step, with aborts between steps."""

from __future__ import annotations

from typing import Callable

from conformance.workloads import Workload
from ref.outputs import RequestOutput


def run_workload(engine, workload: Workload, on_step: Callable[[], None] | None = None,
                 max_steps: int = 100_000) -> dict[int, RequestOutput]:
    """Finished outputs by request index (aborted ones excluded). `on_step` runs after each
    step (tests check invariants there). Raises if the engine stops making progress."""
    for i, (prompt, params) in enumerate(zip(workload.prompts, workload.params)):
        engine.add_request(str(i), prompt, params, priority=workload.priorities[i])
    finished: dict[int, RequestOutput] = {}
    step = 0
    idle_steps = 0
    while engine.has_unfinished_requests():
        for i in workload.aborts.get(step, []):
            engine.abort_request(str(i))
        outs = engine.step()
        idle_steps = 0 if outs else idle_steps + 1
        if idle_steps > 3 and engine.has_unfinished_requests():
            raise AssertionError(f"engine stalled at step {step}: unfinished requests but no progress")
        for out in outs:
            if out.finished:
                finished[int(out.request_id)] = out
        if on_step is not None:
            on_step()
        step += 1
        if step > max_steps:
            raise AssertionError(f"workload did not finish within {max_steps} steps")
    for i in workload.aborted:
        finished.pop(i, None)
    return finished
