"""Summarise a saved pytest-benchmark JSON: a markdown table and one PNG plot.

    python -m benchmarks.report [.benchmarks/.../0001_x.json] [--out benchmarks/results]

With no path, the newest file under .benchmarks/ is used. Writes summary.md and throughput.png
(output tok/s per engine and workload, and KV utilization). summary.md: the engines table, the
GEMM floor and peak with the implementation that set them, the memory table (fast's measured
concurrency beside the Orca contiguous baselines at equal KV slots, and how KV utilization comes
about) and the prefill table (bench_prefill.py: time vs the GEMM floor of the same steps, and
the profiled breakdown).
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


def _by_name(doc: dict, group: str) -> list[dict]:
    return [{"name": b["name"].split("[", 1)[-1].rstrip("]"), **b.get("extra_info", {})}
            for b in doc["benchmarks"] if (b.get("group") or "") == group]


def roofline_md(rs: list[dict]) -> str:
    r = next((r for r in rs if r.get("gemm_floor_s") is not None), None)
    if r is None:
        return ""
    alone = ", ".join(f"{k} alone {v:.3f} s" for k, v in (r.get("gemm_floor_by_impl_s") or {}).items())
    peak = r.get("peak_flops")
    return (f"GEMM floor of the offline workload (fast's own schedule): **{r['gemm_floor_s']:.3f} s**, set by "
            f"{r.get('gemm_floor_impl', 'F.linear')} ({alone}). fp32 GEMM peak: "
            f"{fmt(peak / 1e9 if peak else None, '.0f')} GFLOP/s ({r.get('peak_flops_impl', 'torch.mm')}).\n")


def memory_md(doc: dict) -> str:
    rs = _by_name(doc, "memory")
    if not rs or all("orca_max_concurrency_max" not in r for r in rs):
        return ""
    conc = lambda r, k: " / ".join([fmt(r.get(f"{k}_concurrency_mean"), ".1f"),  # noqa: E731
                                    fmt(r.get(f"{k}_concurrency_saturated_mean"), ".1f"),
                                    fmt(r.get(f"{k}_concurrency_max"), "d")])
    lines = [f"Memory: equal KV memory of {rs[0].get('kv_budget_slots', '?')} token slots. Concurrency = running "
             "requests per step: mean over all steps / mean over the steps in which requests still wait "
             "(memory-bound) / max. The Orca columns are computed from the workload (contiguous reservation of "
             "max_model_len, of the next power of two, of prompt + max_tokens; FCFS, one token per step). KV util = "
             "Σ tokens held ÷ Σ slots of allocated blocks, sampled after every step (harness.KVMonitor); waste / "
             "req = slots allocated but empty per running request ((block_size - 1) / 2 expected).", "",
             "| engine | conc. mean / waiting / max | Orca-Max | Orca-Pow2 | Orca-Oracle | ÷ Orca-Max (waiting) "
             "| ÷ Orca-Oracle (waiting) | KV util | util at peak / step mean | pool used mean / peak | tokens held / req "
             "| waste / req | util if block 8 / 32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rs:
        what_if = r.get("kv_util_if_block_size") or {}
        lines.append("| " + " | ".join([
            r["name"], " / ".join([fmt(r.get("mean_concurrent"), ".1f"), fmt(r.get("concurrency_saturated_mean"), ".1f"),
                                   fmt(r.get("max_concurrent"), "d")]),
            conc(r, "orca_max"), conc(r, "orca_pow2"), conc(r, "orca_oracle"),
            fmt(r.get("concurrency_saturated_over_orca_max"), ".2f"),
            fmt(r.get("concurrency_saturated_over_orca_oracle"), ".2f"),
            fmt(r.get("kv_utilization"), ".1%"),
            f"{fmt(r.get('kv_utilization_at_peak'), '.1%')} / {fmt(r.get('kv_utilization_step_mean'), '.1%')}",
            f"{fmt(r.get('kv_pool_usage_mean'), '.0%')} / {fmt(r.get('kv_pool_usage_peak'), '.0%')}",
            fmt(r.get("kv_tokens_per_request"), ".1f"), fmt(r.get("kv_waste_per_request"), ".2f"),
            f"{fmt(what_if.get('8'), '.1%')} / {fmt(what_if.get('32'), '.1%')}",
        ]) + " |")
    return "\n".join(lines) + "\n"


PROFILE_ORDER = ("gemm", "attention", "kv-store", "norm", "rope", "activation", "residual", "embedding",
                 "other in forward", "sampler", "runner (inputs/outputs)", "engine (scheduler, outputs)", "other")


def prefill_md(doc: dict) -> str:
    rs = [r for r in _by_name(doc, "prefill") if "prefill_s_min" in r]
    if not rs:
        return ""
    r0 = rs[0]
    lines = [f"Prefill: {r0['prompts']} prompts x {r0['prompt_len']} tokens, max_tokens=1, prefix caching off; "
             "time = min over rounds; the GEMM floor replays the same steps' token counts. token rate ÷ GEMM "
             "rate = floor / time; FLOP rate ÷ GEMM rate credits attention's FLOPs as work.", "",
             "| variant | engine | steps (tokens) | time s | prompt tok/s | GEMM floor s | floor set by "
             "| token rate ÷ GEMM rate | FLOP rate ÷ GEMM rate | attention FLOPs ÷ GEMM FLOPs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rs:
        lines.append("| " + " | ".join([
            r["variant"], r.get("engine", ""), " + ".join(str(s[0]) for s in r.get("steps", [])),
            fmt(r["prefill_s_min"], ".3f"), fmt(r.get("prefill_tok_s"), ".0f"), fmt(r.get("gemm_floor_s"), ".3f"),
            r.get("gemm_floor_impl", "?"), fmt(r.get("token_rate_over_gemm_rate"), ".1%"),
            fmt(r.get("flop_rate_over_gemm_rate"), ".1%"), fmt(r.get("attention_flops_over_gemm_flops"), ".1%"),
        ]) + " |")
    cats = [c for c in PROFILE_ORDER if any(c in (r.get("profile_ms") or {}) for r in rs)]
    cats += sorted({c for r in rs for c in (r.get("profile_ms") or {})} - set(cats))
    lines += ["", "Where a profiled round's time goes (torch.profiler, operator self time by calling function; "
              "ms and share of the profiled wall, which the tracer inflates):", "",
              "| | " + " | ".join(r["variant"] for r in rs) + " |", "|---|" + "---|" * len(rs)]
    for c in [*cats, "python & dispatch (rest)"]:
        cells = []
        for r in rs:
            ms = r.get("profile_python_ms") if c.startswith("python") else (r.get("profile_ms") or {}).get(c)
            wall = r.get("profile_wall_ms")
            cells.append("–" if ms is None else f"{ms:.0f} ({100 * ms / wall:.0f}%)" if wall else f"{ms:.0f}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("| profiled wall ms | " + " | ".join(fmt(r.get("profile_wall_ms"), ".0f") for r in rs) + " |")
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
    sections = [markdown(rs, desc), roofline_md(rs), memory_md(doc), prefill_md(doc)]
    (out / "summary.md").write_text("\n".join(sec for sec in sections if sec))
    plot(rs, out / "throughput.png")
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
