"""`python -m conformance`: certify an engine against the reference oracle.

With no arguments: the `quick` profile against `fast` on the embedded tiny model.
Exit code 0 only when every applicable check passed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from conformance.tiers import PROFILES, TIERS

    ap = argparse.ArgumentParser(prog="python -m conformance", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="fast", help="ref | fast | hf | hf-cb | module:factory (default fast)")
    ap.add_argument("--model", default=None, help="local HF checkpoint dir (default: the embedded tiny model)")
    ap.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    ap.add_argument("--tier", action="append", choices=TIERS, help="run only these tiers (repeatable)")
    ap.add_argument("--check", default=None, help="run only the check with this name")
    ap.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: derandomized)")
    ap.add_argument("--report", default=None, help="write a JSON report here")
    ap.add_argument("--no-shrink", action="store_true", help="report the first failing example unshrunk (faster)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    from conformance.adapters import load_adapter
    from conformance.runner import run_check, select, table, write_report
    from conformance.tiers import MAX_MODEL_LEN, PROFILES, Context

    if args.model is None:
        from ref.models import tiny_checkpoint

        args.model = str(tiny_checkpoint())
    make = lambda model_dir, **opts: load_adapter(args.engine, model_dir, **opts)  # noqa: E731
    ctx = Context(adapter=make(args.model, max_model_len=MAX_MODEL_LEN), model_dir=args.model,
                  profile=PROFILES[args.profile], make_adapter=make)
    checks = select(args.tier, args.check)
    print(f"conformance: engine={args.engine} model={args.model} profile={args.profile}", flush=True)
    results = []
    t0 = time.perf_counter()
    for check in checks:
        replay = (f"python -m conformance --engine {args.engine} --model {args.model} --profile {args.profile} "
                  f"--tier {check.tier} --check {check.name}" + (f" --seed {args.seed}" if args.seed is not None else ""))
        r = run_check(check, ctx, args.seed, not args.no_shrink, replay)
        results.append(r)
        print(f"  [{r.status:>6}] {r.tier}/{r.check}: {r.examples} examples, {r.seconds:.1f}s", flush=True)
        if r.status == "failed":
            print("    " + r.message.strip().replace("\n", "\n    ")[:4000])
            print(f"    replay: {replay}")
    print()
    print(table(results))
    print(f"\ntotal {time.perf_counter() - t0:.1f}s")
    if args.report:
        write_report(args.report, results, {"engine": args.engine, "model": args.model, "profile": args.profile,
                                            "seed": args.seed})
    failed = [r for r in results if r.status == "failed"]
    print("FAILED" if failed else "PASSED", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
