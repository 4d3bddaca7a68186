"""Summarise a saved pytest-benchmark JSON: a markdown table and one PNG plot.

    python -m benchmarks.report [.benchmarks/.../0001_x.json] [--out benchmarks/results]

With no path, the newest file under .benchmarks/ is used. Writes summary.md and throughput.png
(output tok/s per engine and workload, and KV utilization).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def newest_result(root: Path = Path(".benchmarks")) -> Path:
    files = sorted(root.rglob("*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit("no saved benchmark JSON under .benchmarks/ (run `make bench` first)")
    return files[-1]


def rows(doc: dict) -> list[dict]:
    out = []
    for b in doc["benchmarks"]:
        info = b.get("extra_info", {})
        if "output_tok_s" not in info:
            continue
        out.append({"group": b.get("group") or "", "name": b["name"].split("[", 1)[-1].rstrip("]"), **info})
    return out


def fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown(rs: list[dict], machine: str) -> str:
    lines = [f"Machine: {machine}", "",
             "| workload | engine | wall s | out tok/s | TTFT p50 s | TPOT p50 ms | KV util | max conc. | preempt | prefix hit | FLOP/s ÷ peak | time ÷ GEMM floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rs:
        lines.append("| " + " | ".join([
            r["group"], r["name"], fmt(r["wall_s"], ".2f"), fmt(r["output_tok_s"], ".1f"),
            fmt(r.get("ttft_p50_s"), ".2f"), fmt(r["tpot_p50_s"] * 1e3 if r.get("tpot_p50_s") else None, ".1f"),
            fmt(r.get("kv_utilization"), ".1%"), fmt(r.get("max_concurrent"), "d"), fmt(r.get("preemptions"), "d"),
            fmt(r.get("prefix_hit_rate"), ".1%"), fmt(r.get("flops_fraction_of_peak"), ".1%"),
            fmt(r.get("time_over_gemm_floor"), ".2f"),
        ]) + " |")
    return "\n".join(lines) + "\n"


def plot(rs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['group']}\n{r['name']}" for r in rs]
    ax1.barh(labels, [r["output_tok_s"] for r in rs], color="tab:blue")
    ax1.set_xlabel("output tokens / s (higher is better)")
    ax1.invert_yaxis()
    kv = [(lab, r["kv_utilization"]) for lab, r in zip(labels, rs) if r.get("kv_utilization") is not None]
    ax2.barh([k for k, _ in kv], [100 * v for _, v in kv], color="tab:green")
    ax2.set_xlabel("KV slots holding tokens (%)")
    ax2.set_xlim(0, 100)
    ax2.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path", nargs="?", default=None)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    path = Path(args.path) if args.path else newest_result()
    doc = json.loads(path.read_text())
    machine = doc.get("machine_info", {})
    desc = f"{machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('cpu', {}).get('count', '?')} CPUs, " \
           f"python {machine.get('python_version', '?')}"
    rs = rows(doc)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(markdown(rs, desc))
    plot(rs, out / "throughput.png")
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
