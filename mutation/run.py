"""Mutation score of the conformance suite over `fast`'s core, measured with cosmic-ray.

    .venv/bin/python -m mutation.run                      # every module, 15 sampled mutants each
    .venv/bin/python -m mutation.run --module scheduler --sample 40 --seed 2

For each module: a clean copy of the committed tree (a `git worktree` under a temp dir, so the
working tree is never mutated), `cosmic-ray init` to enumerate every mutant, a seeded random
sample kept (the rest marked skipped), `cosmic-ray exec` with the conformance suite's quick
profile (the tiers that exercise the module) as the test command, then a report of killed,
survived and incompetent mutants with each survivor's diff, written to
`mutation/results/<module>.md`. Judging a survivor equivalent is a human's call: README lists
those judged so.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    path: str  # module under mutation, relative to the repository root
    tiers: tuple[str, ...]  # the conformance tiers that exercise it


TARGETS = {
    "block_pool": Target("fast/core/block_pool.py", ("allocator", "e2e")),
    "kv_cache_manager": Target("fast/core/kv_cache_manager.py", ("allocator", "e2e")),
    "scheduler": Target("fast/core/scheduler.py", ("scheduler", "e2e")),
    "policy": Target("fast/core/policy.py", ("scheduler",)),  # the built-in policies the scheduler asks
    "sampler": Target("fast/worker/sampler.py", ("e2e", "determinism")),
}

# Mutations of this kind only change messages or debugging aids, never behaviour a test could see.
EXCLUDED_OPERATORS = ("core/ZeroIterationForLoop",)
TIMEOUT_S = 900.0  # cosmic-ray's limit per mutant; the suite's own per-check budget is CHECK_TIMEOUT_S
CHECK_TIMEOUT_S = 240  # a mutant that hangs the engine fails its check ("timeout"), i.e. is killed


def test_command(target: Target) -> str:
    tiers = " ".join(f"--tier {t}" for t in target.tiers)
    return f"{sys.executable} -m conformance --profile quick --no-shrink --timeout {CHECK_TIMEOUT_S} {tiers}"


def config_text(target: Target) -> str:
    return textwrap.dedent(f"""\
        [cosmic-ray]
        module-path = "{target.path}"
        timeout = {TIMEOUT_S}
        excluded-modules = []
        test-command = "{test_command(target)}"

        [cosmic-ray.distributor]
        name = "local"
        """)


def annotation_spans(path: Path) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions of every type annotation: with `from __future__ import annotations`
    they are never evaluated, so a mutant inside one is equivalent by construction."""
    import ast

    spans = []
    for node in ast.walk(ast.parse(path.read_text())):
        notes = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            notes.append(node.returns)
        elif isinstance(node, ast.arg):
            notes.append(node.annotation)
        elif isinstance(node, ast.AnnAssign):
            notes.append(node.annotation)
        spans += [((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset)) for n in notes if n is not None]
    return spans


def _in_annotation(item, spans) -> bool:
    return any(start <= tuple(m.start_pos) and tuple(m.end_pos) <= end
               for m in item.mutations for start, end in spans)


def sample_jobs(session: Path, k: int, seed: int, module: Path) -> tuple[int, int]:
    """Keep k pending mutants chosen at random (seeded); mark the others skipped."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    spans = annotation_spans(module)
    with use_db(str(session), WorkDB.Mode.open) as db:
        jobs = [item for item in db.pending_work_items
                if not any(m.operator_name in EXCLUDED_OPERATORS for m in item.mutations)
                and not _in_annotation(item, spans)]
        excluded = [item.job_id for item in db.pending_work_items if item not in jobs]
        keep = set(item.job_id for item in random.Random(seed).sample(jobs, min(k, len(jobs))))
        skip = [item.job_id for item in jobs if item.job_id not in keep] + excluded
        db.set_multiple_results(skip, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))
        return len(jobs), len(keep)


def report(session: Path, name: str, total: int, out: Path) -> dict:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    counts = {"killed": 0, "survived": 0, "incompetent": 0}
    survivors = []
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome is WorkerOutcome.SKIPPED:
                continue
            if result.test_outcome is TestOutcome.SURVIVED:
                counts["survived"] += 1
                survivors.append((item, result))
            elif result.test_outcome is TestOutcome.INCOMPETENT:
                counts["incompetent"] += 1
            else:
                counts["killed"] += 1
    judged = counts["killed"] + counts["survived"]
    score = counts["killed"] / judged if judged else float("nan")
    lines = [f"# Mutation results: {TARGETS[name].path}", "",
             "(mutants inside type annotations are left out: never evaluated, so equivalent)", "",
             f"test command: `{test_command(TARGETS[name])}`", "",
             f"mutants in the module: {total}; sampled: {judged + counts['incompetent']}; killed "
             f"{counts['killed']}, survived {counts['survived']}, incompetent {counts['incompetent']}; "
             f"score (killed / (killed + survived)): {score:.1%}", ""]
    for item, result in survivors:
        m = item.mutations[0]
        lines += [f"## survived: {m.operator_name} #{m.occurrence} at line {m.start_pos[0]}", "",
                  "```diff", (result.diff or "").strip(), "```", ""]
    out.write_text("\n".join(lines))
    return {**counts, "score": score}


def run_module(name: str, sample: int, seed: int, workdir: Path) -> dict:
    target = TARGETS[name]
    tree = workdir / f"tree-{name}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), "HEAD"],
                   check=True, capture_output=True)
    try:
        cfg, session = workdir / f"{name}.toml", workdir / f"{name}.sqlite"
        cfg.write_text(config_text(target))
        cr = [sys.executable, "-m", "cosmic_ray.cli"]
        subprocess.run([*cr, "init", str(cfg), str(session)], cwd=tree, check=True)
        total, kept = sample_jobs(session, sample, seed, tree / target.path)
        print(f"{name}: {total} mutants, running {kept}", flush=True)
        subprocess.run([*cr, "exec", str(cfg), str(session)], cwd=tree, check=True)
        out = ROOT / "mutation" / "results" / f"{name}.md"
        out.parent.mkdir(exist_ok=True)
        return report(session, name, total, out)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mutation.run", description=__doc__.split("\n")[0])
    ap.add_argument("--module", action="append", choices=sorted(TARGETS), help="default: all")
    ap.add_argument("--sample", type=int, default=15, help="mutants per module (default 15)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pagedlm-mutation-") as tmp:
        results = {m: run_module(m, args.sample, args.seed, Path(tmp)) for m in args.module or sorted(TARGETS)}
    killed = sum(r["killed"] for r in results.values())
    judged = killed + sum(r["survived"] for r in results.values())
    for m, r in results.items():
        print(f"{m:18s} killed {r['killed']:3d}  survived {r['survived']:3d}  incompetent "
              f"{r['incompetent']:3d}  score {r['score']:.1%}")
    print(f"overall: {killed}/{judged} = {killed / judged:.1%}" if judged else "nothing judged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
