"""Runs checks, times them, counts examples, and reports a table and a JSON document."""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed as hyp_seed, settings
from hypothesis.errors import UnsatisfiedAssumption
from hypothesis.stateful import run_state_machine_as_test

from conformance.isolation import EngineFailure, EngineHost
from conformance.tiers import CHECKS, TIERS, Check, Context, NotApplicable

# Wall-clock budget of one check (seconds), per profile; `--timeout` overrides. An engine that
# is still busy when it runs out fails that check ("timeout after N s", naming the call).
CHECK_TIMEOUT_S = {"quick": 300.0, "full": 900.0, "deep": 3600.0}


@dataclass
class CheckResult:
    tier: str
    check: str
    status: str  # "passed" | "failed" | "n/a"
    examples: int  # every example run: the targeted ones and Hypothesis' (discarded ones not counted)
    seconds: float
    message: str = ""
    settings: dict = field(default_factory=dict)
    replay: str = ""
    coverage: dict = field(default_factory=dict)  # feature/path -> examples that reached it
    targeted: int = 0  # of `examples`, the fixed cases run before the drawn ones


# Health checks left on: a generator that discards too much (filter_too_much) or cannot make
# examples is a finding about the run. Off: slowness and size, which an engine's speed and the
# workloads' size make normal here.
QUIET_HEALTH_CHECKS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]


def _settings(ctx: Context, seed: int | None, shrink: bool, scale: int = 1) -> settings:
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(max_examples=ctx.profile.examples * scale, deadline=None, database=None, phases=phases,
                    derandomize=seed is None, stateful_step_count=ctx.profile.stateful_steps,
                    suppress_health_check=QUIET_HEALTH_CHECKS, print_blob=False)


def _failure_text(err: BaseException) -> str:
    notes = getattr(err, "__notes__", [])
    text = f"{type(err).__name__}: {err}"
    if isinstance(err, BaseExceptionGroup):
        text = "\n".join(_failure_text(e) for e in err.exceptions)
    if notes:
        text += "\n" + "\n".join(notes)
    return text


def run_check(check: Check, ctx: Context, seed: int | None, shrink: bool, replay: str,
              engine: EngineHost | None = None, timeout: float | None = None) -> CheckResult:
    """Run one check. With `engine`, the adapter lives in that engine process: `ctx.adapter` and
    `ctx.make_adapter` are set to its proxies, and every call into it shares the `timeout` budget.
    `seconds` is the wall time of the whole check (starting the engine process included)."""
    t0 = time.perf_counter()
    count = [0]
    targeted = 0
    first_failure: list[str] = []  # shown if the engine then fails hard (e.g. times out while shrinking)
    covered: dict = {}
    cfg = _settings(ctx, seed, shrink, check.example_scale)
    info = {"max_examples": ctx.profile.examples * check.example_scale, "seed": seed, "profile": ctx.profile.name}
    if engine is not None:
        info["timeout_s"] = timeout
    try:
        if engine is not None:
            engine.begin(timeout)
            ctx.adapter, ctx.make_adapter = engine.adapter, engine.make_adapter
        built, body = check.build(ctx)
        targeted = _targeted_of(built, body)
        count[0] += targeted
        if check.stateful:
            for machine in built:
                counted = type(machine.__name__, (machine,), {
                    "__init__": lambda self, _m=machine: (count.__setitem__(0, count[0] + 1), _m.__init__(self))[1]})
                if seed is not None:  # as for the other checks: the same seed, the same runs
                    counted = hyp_seed(seed)(counted)
                run_state_machine_as_test(counted, settings=cfg)
        else:
            @cfg
            @given(built)
            def prop(value: Any) -> None:
                try:
                    body(ctx, value)
                except UnsatisfiedAssumption:  # discarded (e.g. nothing the engine supports): not run
                    raise
                except Exception as err:
                    count[0] += 1
                    if not first_failure:
                        first_failure.append(_failure_text(err))
                    raise
                count[0] += 1

            if seed is not None:
                prop = hyp_seed(seed)(prop)
            prop()
        coverage = _coverage_of(built, body)
        if coverage is not None:
            covered.update(coverage.as_dict())
            coverage.check_minimum()  # what the examples never reached fails the check
    except NotApplicable as na:
        return CheckResult(check.tier, check.name, "n/a", 0, time.perf_counter() - t0, str(na), info, replay)
    except EngineFailure as err:  # hung, died, or raised a BaseException: the engine process is gone
        message = str(err)
        if first_failure:
            message += "\nbefore that, this example had failed:\n" + first_failure[0]
        return CheckResult(check.tier, check.name, "failed", count[0], time.perf_counter() - t0, message, info, replay,
                           covered, targeted)
    except Exception as err:  # noqa: BLE001 - a failed check of any kind is reported, not raised
        message = _failure_text(err)
        if not message.strip() or message.startswith("AssertionError: \n"):
            message += "\n" + traceback.format_exc(limit=-3)
        return CheckResult(check.tier, check.name, "failed", count[0], time.perf_counter() - t0, message, info, replay,
                           covered, targeted)
    finally:
        if engine is not None:
            engine.end()
    return CheckResult(check.tier, check.name, "passed", count[0], time.perf_counter() - t0, "", info, replay,
                       covered, targeted)


def _targeted_of(built: Any, body: Any) -> int:
    """How many fixed cases the check ran (or will run) besides the drawn examples: `targeted` on
    the body function or its object (e2e, kernel), or on the stateful run (allocator scenarios)."""
    for holder in (body, getattr(body, "__self__", None), built):
        n = getattr(holder, "targeted", None)
        if isinstance(n, int):
            return n
    return 0


def _coverage_of(built: Any, body: Any):
    """The check's coverage record (`as_dict()`, `check_minimum()`), if it keeps one: on the
    body function or its object (e2e, kernel), or on the stateful run (allocator)."""
    for holder in (body, getattr(body, "__self__", None), built):
        coverage = getattr(holder, "coverage", None)
        if coverage is not None and hasattr(coverage, "check_minimum"):
            return coverage
    return None


def select(tiers: list[str] | None, check_name: str | None) -> list[Check]:
    chosen = [c for c in CHECKS if (not tiers or c.tier in tiers) and (check_name is None or c.name == check_name)]
    if not chosen:
        raise ValueError(f"no check matches tiers={tiers} check={check_name!r}; tiers: {TIERS}")
    return chosen


def table(results: list[CheckResult]) -> str:
    rows = [("tier", "checks", "examples", "targeted", "passed", "failed", "n/a", "time")]
    for tier in TIERS:
        rs = [r for r in results if r.tier == tier]
        if not rs:
            continue
        rows.append((tier, str(len(rs)), str(sum(r.examples for r in rs)), str(sum(r.targeted for r in rs)),
                     str(sum(r.status == "passed" for r in rs)), str(sum(r.status == "failed" for r in rs)),
                     str(sum(r.status == "n/a" for r in rs)), f"{sum(r.seconds for r in rs):.1f}s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    covered = [r for r in results if r.coverage]
    if covered:
        lines += ["", "what the examples exercised (examples per feature or path):"]
        for r in covered:
            items = ", ".join(f"{k} {v}" for k, v in r.coverage.items())
            lines.append(f"  {r.tier}/{r.check}: {items}")
    return "\n".join(lines)


def write_report(path: str, results: list[CheckResult], meta: dict) -> None:
    passed = all(r.status != "failed" for r in results) and not meta.get("interrupted")
    doc = {**meta, "passed": passed, "checks": [asdict(r) for r in results]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
