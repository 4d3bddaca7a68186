"""`python -m conformance`: certify an engine against the reference oracle.

With no arguments: the `quick` profile against `fast` on the embedded tiny model.
The engine runs in a child process; each check has a time budget (--timeout). Exit code 0
only when every applicable check passed; 130 after Ctrl-C (the finished checks are reported).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Kept free of torch/transformers imports so that `--help` answers at once; the lists below are
# checked against conformance.tiers once the arguments are parsed.
PROFILE_NAMES = ("quick", "full", "deep")
TIER_NAMES = ("model", "kernel", "allocator", "scheduler", "sampler", "e2e", "determinism", "robustness",
              "structured")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m conformance", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="fast", help="ref | fast | fast-tp2 | hf | hf-cb | module:factory (default fast)")
    ap.add_argument("--model", default=None, help="local HF checkpoint dir (default: the embedded tiny model)")
    ap.add_argument("--profile", default="quick", choices=PROFILE_NAMES)
    ap.add_argument("--tier", action="append", choices=TIER_NAMES, help="run only these tiers (repeatable)")
    ap.add_argument("--check", default=None, help="run only the check with this name")
    ap.add_argument("--policy", action="append", type=_policy_spec, metavar="NAME|module:attr",
                    help="scheduling policy for the scheduler and e2e tiers instead of drawing fcfs/priority: "
                         "fcfs, priority, or module:attr naming a fast.core.policy.SchedulingPolicy instance "
                         "or a class taking no arguments (repeatable: each run draws one)")
    ap.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: derandomized)")
    ap.add_argument("--report", default=None, help="write a JSON report here")
    ap.add_argument("--no-shrink", action="store_true", help="report the first failing example unshrunk (faster)")
    ap.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                    help="time budget of each check (default per profile: quick 300, full 900, deep 3600)")
    ap.add_argument("--no-isolation", action="store_true",
                    help="UNSAFE, for debugging an adapter: run the engine in the suite's own process, "
                         "with no time budget; the engine could then patch or hang the suite")
    return ap.parse_args(argv)


def _policy_spec(spec: str) -> str:
    """`--policy`, checked while the arguments are parsed (the module is imported): the spec string
    itself, which the e2e tier sends to the engine process (imported again there)."""
    from fast.core.policy import load_policy

    try:
        load_policy(spec)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return spec


def _quiet_libraries() -> None:
    """Environment read at import by transformers and the engines (inherited by the engine process)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads must not spin (isolation.PASSIVE_THREADS)


class _CtrlC:
    """SIGINT raises KeyboardInterrupt and is also remembered: Python drops an exception raised
    where it cannot propagate (e.g. in a garbage-collector callback, which Hypothesis installs),
    so the run also checks the flag between checks."""

    def __init__(self) -> None:
        import signal

        self.pressed = False
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.pressed = True
        raise KeyboardInterrupt

    def raise_if_pressed(self) -> None:
        if self.pressed:
            raise KeyboardInterrupt

    def restore(self) -> None:
        import signal

        signal.signal(signal.SIGINT, self._previous)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet_libraries()
    import torch

    if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from conformance.adapters import check_engine_spec, load_adapter
    from conformance.isolation import EngineHost, quiet_transformers
    from conformance.runner import CHECK_TIMEOUT_S, run_check, select, table, write_report
    from conformance.tiers import MAX_MODEL_LEN, PROFILES, TIERS, Context

    assert set(PROFILE_NAMES) == set(PROFILES) and TIER_NAMES == TIERS, "update the CLI's lists of names"
    quiet_transformers()
    check_engine_spec(args.engine)
    if args.model is None:
        from ref.models import tiny_checkpoint

        args.model = str(tiny_checkpoint())
    checks = select(args.tier, args.check)
    timeout = args.timeout if args.timeout is not None else CHECK_TIMEOUT_S[args.profile]
    if args.no_isolation:
        make = lambda model_dir, **opts: load_adapter(args.engine, model_dir, **opts)  # noqa: E731
        engine, adapter = None, make(args.model, max_model_len=MAX_MODEL_LEN)
    else:
        engine = EngineHost(args.engine, args.model, {"max_model_len": MAX_MODEL_LEN})
        make, adapter = engine.make_adapter, None  # the engine process starts inside the first check
    ctx = Context(adapter=adapter, model_dir=args.model, profile=PROFILES[args.profile], make_adapter=make,
                  policies=tuple(args.policy or ()))
    isolation = "off (unsafe)" if args.no_isolation else f"engine process, {timeout:g} s per check"
    print(f"conformance: engine={args.engine} model={args.model} profile={args.profile} isolation={isolation}",
          flush=True)
    meta = {"engine": args.engine, "model": args.model, "profile": args.profile, "seed": args.seed,
            "policies": list(args.policy or ()),
            "isolated": not args.no_isolation, "timeout_s": None if args.no_isolation else timeout}
    results = []
    interrupted = False
    t0 = time.perf_counter()
    ctrl_c = _CtrlC()
    try:
        for check in checks:
            ctrl_c.raise_if_pressed()
            replay = (f"python -m conformance --engine {args.engine} --model {args.model} --profile {args.profile} "
                      f"--tier {check.tier} --check {check.name}" + (f" --seed {args.seed}" if args.seed is not None else "")
                      + "".join(f" --policy {p}" for p in args.policy or ()))
            r = run_check(check, ctx, args.seed, not args.no_shrink, replay, engine, timeout)
            ctrl_c.raise_if_pressed()  # a Ctrl-C swallowed inside the check: its result is void
            results.append(r)
            status = f"failed ({r.message.split(',')[0]})" if r.message.startswith("timeout after") else r.status
            targeted = f" ({r.targeted} targeted)" if r.targeted else ""
            print(f"  [{status:>6}] {r.tier}/{r.check}: {r.examples} examples{targeted}, {r.seconds:.1f}s", flush=True)
            if r.status == "failed":
                print("    " + r.message.strip().replace("\n", "\n    ")[:4000])
                print(f"    replay: {replay}")
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: reporting the checks that finished", flush=True)
    finally:
        ctrl_c.restore()
        if engine is not None:
            engine.close()
    print()
    print(table(results))
    print(f"\ntotal {time.perf_counter() - t0:.1f}s")
    if args.report:
        write_report(args.report, results, {**meta, "interrupted": interrupted})
    failed = [r for r in results if r.status == "failed"]
    print("INTERRUPTED" if interrupted else "FAILED" if failed else "PASSED", flush=True)
    return 130 if interrupted else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
