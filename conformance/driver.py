"""Run a workload through an engine's `LLMEngine` API step by step, with aborts between steps.

The driver also checks the step contract of SPEC §2: every output names a request of the
workload; a finished request is reported exactly once, with `finished=True`, and never again; an
aborted request is never reported after its abort; every request that is not aborted finishes.
"""

from __future__ import annotations

from typing import Callable

from conformance.workloads import Workload
from ref.outputs import RequestOutput


def run_workload(engine, workload: Workload, on_step: Callable[[], None] | None = None,
                 max_steps: int = 100_000) -> dict[int, RequestOutput]:
    """Finished outputs by request index (aborted ones excluded). `on_step` runs after each
    step (tests check invariants there). Raises if the engine stops making progress or breaks
    the step contract, naming the step and the request."""
    for i, (prompt, params) in enumerate(zip(workload.prompts, workload.params)):
        engine.add_request(str(i), prompt, params, priority=workload.priorities[i])
    finished: dict[int, RequestOutput] = {}
    aborted: set[int] = set()
    step = 0
    idle_steps = 0
    while engine.has_unfinished_requests():
        for i in workload.aborts.get(step, []):
            engine.abort_request(str(i))
            aborted.add(i)
        outs = engine.step()
        idle_steps = 0 if outs else idle_steps + 1
        if idle_steps > 3 and engine.has_unfinished_requests():
            raise AssertionError(f"engine stalled at step {step}: unfinished requests but no progress")
        for out in outs:
            i = _request_index(out.request_id, len(workload.prompts), step)
            if i in finished:
                raise AssertionError(f"step {step}: request {out.request_id} reported again after it finished")
            if i in aborted:
                raise AssertionError(f"step {step}: request {out.request_id} reported after it was aborted")
            if out.finished:
                finished[i] = out
        if on_step is not None:
            on_step()
        step += 1
        if step > max_steps:
            raise AssertionError(f"workload did not finish within {max_steps} steps")
    never = sorted(set(range(len(workload.prompts))) - set(finished) - aborted)
    if never:
        raise AssertionError(f"requests {never} never finished (has_unfinished_requests() is False after "
                             f"{step} steps)")
    for i in workload.aborted:
        finished.pop(i, None)
    return finished


def _request_index(request_id: str, num_requests: int, step: int) -> int:
    if not (isinstance(request_id, str) and request_id.isdigit() and int(request_id) < num_requests):
        raise AssertionError(f"step {step}: output for request id {request_id!r}, which was never added")
    return int(request_id)


def describe(workload: Workload, options: dict) -> str:
    """A workload and its engine options, for a failure message."""
    reqs = "; ".join(f"prompt {p['prompt_token_ids'][:6]}... ({len(p['prompt_token_ids'])} tokens) {q}"
                     for p, q in zip(workload.prompts, workload.params))
    return f"engine options {options}, aborts {workload.aborts}, requests: {reqs}"


def run_targeted(ctx, body: Callable, cases: list[tuple[Workload, dict]], label: str) -> None:
    """Run a tier's targeted cases through its example `body`, each failure naming its case; an
    engine that died or hung (EngineFailure) stays itself."""
    from conformance.isolation import EngineFailure

    for i, case in enumerate(cases):
        try:
            body(ctx, case)
        except EngineFailure:
            raise
        except Exception as err:  # noqa: BLE001 - named with its case
            what = str(err) if isinstance(err, AssertionError) else f"{type(err).__name__}: {err}"
            raise AssertionError(f"targeted {label} case {i} ({describe(*case)}): {what}") from err

