"""`python -m fast.trace`: run a small workload with tracing on, then draw what the engine did.

    python -m fast.trace --out /tmp/tr                           # fast, the offline workload
    python -m fast.trace --workload preemption --out /tmp/tr     # see fast/trace/workloads.py
    python -m fast.trace --engine ref --out /tmp/tr-ref          # the oracle, same KV budget
    python -m fast.trace --out /tmp/tr --request 3 --token 5     # the path of that token

Writes trace.jsonl, timeline.png, block_map.png, token_path.txt and summary.txt into --out and
prints the summary, the token path and the files. The flags left out take the workload's options.

`--engine ref` runs `ref.LLMEngine` (static batches, a contiguous reservation of prompt +
max_tokens per row) under the same KV budget in slots, num_kv_blocks * block_size: its
`max_batch` is as many rows of the workload's largest reservation as fit in that budget (and no
more than --max-num-seqs).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from fast.trace.workloads import WORKLOADS, Workload, get_workload, replay

ENGINE_FLAGS = ("block_size", "num_kv_blocks", "max_num_batched_tokens", "max_num_seqs", "policy")


def _int_at_least(minimum: int):
    """An argparse type: an integer >= minimum (argparse names the flag in its error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


_positive, _non_negative = _int_at_least(1), _int_at_least(0)


def _policy(text: str):
    from fast.core.policy import load_policy

    try:
        return load_policy(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fast.trace", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the embedded tiny model, random weights)")
    p.add_argument("--workload", default="offline", choices=sorted(WORKLOADS))
    p.add_argument("--engine", default="fast", choices=("fast", "ref"))
    p.add_argument("--out", required=True, type=Path, help="folder for the trace, pictures and texts")
    p.add_argument("--request", help="request id ('3') or sample id ('3#1') whose token path to print")
    p.add_argument("--token", type=_non_negative, help="output token index of that sample (default 2)")
    p.add_argument("--block-size", type=_positive)
    p.add_argument("--num-kv-blocks", type=_positive)
    p.add_argument("--max-num-batched-tokens", type=_positive)
    p.add_argument("--max-num-seqs", type=_positive)
    p.add_argument("--policy", type=_policy, help="fcfs, priority, or module:attr naming a "
                   "fast.core.policy.SchedulingPolicy (e.g. examples.shortest_prompt_first:ShortestPromptFirst)")
    return p


def engine_options(workload: Workload, args: argparse.Namespace) -> dict:
    """The workload's options with the flags given on top."""
    options = dict(workload.options)
    options.update({name: getattr(args, name) for name in ENGINE_FLAGS if getattr(args, name) is not None})
    return options


@dataclass(frozen=True)
class RefBatchPlan:
    """How ref's static batch fits the fast engine's KV budget."""

    budget_slots: int  # num_kv_blocks * block_size
    row_blocks: int  # blocks of block_size one row reserves (the workload's largest reservation)
    rows_fit: int
    max_batch: int

    def describe(self, block_size: int, max_num_seqs: int) -> str:
        return (f"ref: KV budget {self.budget_slots} slots; a row reserves up to {self.row_blocks} blocks of "
                f"{block_size} (prompt + max_tokens), so {self.rows_fit} rows fit; max_batch = {self.max_batch} "
                f"(at most --max-num-seqs {max_num_seqs})")


def plan_ref_batch(workload: Workload, options: dict) -> RefBatchPlan:
    bs, nb = options["block_size"], options["num_kv_blocks"]
    row_blocks = math.ceil(max(workload.reservations(options["max_model_len"])) / bs)
    rows_fit = nb // row_blocks
    max_batch = min(rows_fit, options["max_num_seqs"])
    if max_batch < workload.max_n:
        raise ValueError(f"--num-kv-blocks {nb}: ref runs each of n={workload.max_n} samples in its own row of "
                         f"{row_blocks} blocks, but only {max_batch} rows fit; give more blocks")
    return RefBatchPlan(nb * bs, row_blocks, rows_fit, max_batch)


def run_fast(model: str, workload: Workload, options: dict, trace_path: Path):
    """Run the workload on `fast` with tracing to `trace_path`; (meta, steps, token_text)."""
    from fast import LLM
    from fast.trace import read_trace

    llm = LLM(model, trace=str(trace_path), **options)
    try:
        replay(workload, llm.llm_engine)
    finally:
        llm.shutdown()
    meta, steps = read_trace(trace_path)
    return meta, steps, llm.llm_engine.codec.token_text


def run_ref(model: str, workload: Workload, options: dict, trace_path: Path, plan: RefBatchPlan):
    """Run the workload on `ref` through a RefObserver; (meta, steps, token_text)."""
    from fast.trace import read_trace
    from fast.trace.ref_observer import RefObserver
    from ref.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model=model, max_model_len=options["max_model_len"], max_batch=plan.max_batch))
    observer = RefObserver(engine, options["num_kv_blocks"], options["block_size"], str(trace_path))
    try:
        replay(workload, engine, observer.step)
    finally:
        observer.close()
    meta, steps = read_trace(trace_path)
    return meta, steps, engine.codec.token_text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from fast.trace.render import find_token, render_all

    workload = get_workload(args.workload)
    options = engine_options(workload, args)
    notes = [f"workload {workload.name}: {workload.description}"]
    if args.model is None:
        from ref.models import tiny_checkpoint

        model = str(tiny_checkpoint())
        notes.append(f"model: {model} - the embedded tiny model: random weights, so its output is gibberish by design")
    else:
        model = args.model
        notes.append(f"model: {model}")
    args.out.mkdir(parents=True, exist_ok=True)
    trace_path = args.out / "trace.jsonl"
    try:
        if args.engine == "ref":
            plan = plan_ref_batch(workload, options)
            notes.append(plan.describe(options["block_size"], options["max_num_seqs"]))
            if args.policy is not None:
                notes.append(f"ref: --policy {args.policy.name} ignored (ref serves static batches in arrival order)")
            meta, steps, token_text = run_ref(model, workload, options, trace_path, plan)
        else:
            meta, steps, token_text = run_fast(model, workload, options, trace_path)
    except ValueError as e:  # an option the engine rejects names itself
        parser.error(str(e))
    try:
        find_token(meta, steps, args.request, args.token)
    except ValueError as e:
        parser.error(f"argument --request/--token: {e}")
    files = render_all(meta, steps, args.out, args.request, args.token, token_text)
    text = "\n".join(notes) + "\n" + files["summary"].read_text(encoding="utf-8")
    files["summary"].write_text(text, encoding="utf-8")
    print(text)
    print(files["token_path"].read_text(encoding="utf-8"))
    print("files:")
    for path in [trace_path, *files.values()]:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
