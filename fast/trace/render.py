"""Pictures and text of a step trace (`fast/trace/schema.py`), for `fast` and `ref` alike.

    timeline_png(meta, steps, path)     samples x steps: waiting, prefill chunks, decodes,
                                        recomputes, forks, preemptions, finishes; under it the
                                        tokens scheduled per step against the budget
    block_map_png(meta, steps, path)    KV blocks x steps: owner, fill, sharing, free/cached
    token_path(meta, steps, ...)        one token's way through the engine, with the step's timings
    summary(meta, steps)                the trace in numbers (`trace_stats` gives them as data)
    render_all(meta, steps, out_dir)    all four into a folder

matplotlib is imported only when a picture is drawn, through its object API (`Figure` with the
Agg canvas): no pyplot, no backend switch, nothing global is touched.

Index arithmetic of a token (position p = prompt length + output index; its K/V slot)::

    table = [b0, b1, b2]   block_size = 4
    p:      0 1 2 3 | 4 5 6 7 | 8 9 ...
    block:  b0      | b1      | b2
    slot(p) = table[p // block_size] * block_size + p % block_size
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

FIG_WIDTH_IN, DPI = 12.8, 100  # 1280 px: README width
MAX_ROWS_DRAWN = 80  # samples in the timeline
MAX_STEPS_DRAWN = 600
MAX_BLOCKS_DRAWN = 256
MAX_SUB_ROWS = 8  # a block is drawn as min(block_size, this) stripes: its fill is visible

# Timeline state -> (colour, legend label). Order is the legend's.
STATES: dict[str, tuple[str, str]] = {
    "waiting": ("#d0d0d0", "waiting (queued)"),
    "running": ("#fff3b0", "running, not scheduled"),
    "prefill": ("#9ecae1", "prefill chunk"),
    "prefill_last": ("#2166ac", "prefill, last chunk (samples)"),
    "decode": ("#41ab5d", "decode (1 token)"),
    "recompute": ("#fdae6b", "recompute (after preemption)"),
    "recompute_last": ("#d94801", "recompute, last chunk (samples)"),
    "forked": ("#9e9ac8", "forked (shares blocks, samples)"),
}
FREE_COLOUR = "#ffffff"
CACHED_COLOURS = ("#c4c4c4", "#ececec")  # alternating stripes: free but holding a prefix-cache key
UNUSED_ALPHA = (0.22, 0.40)  # alternating stripes of a block's allocated but unwritten slots
NOT_RECORDED = "(not in the record: added and freed within the step)"  # see _table_at


# ---------------------------------------------------------------------------------------- ids
def sample_sort_key(key: str) -> tuple:
    """'10#2' after '9#0': numeric request ids in numeric order, then the sample index."""
    rid, _, idx = key.rpartition("#")
    index = int(idx) if idx.isdigit() else 0
    return (0, int(rid), "", index) if rid.isdigit() else (1, 0, rid, index)


def sample_order(steps: list[dict]) -> list[str]:
    """Every sample of the trace, in order of first appearance (ties: natural id order)."""
    seen: dict[str, int] = {}
    for rec in steps:
        ids = ([e["id"] for e in rec["scheduled"]] + [child for _, child in rec["forked"]]
               + rec["running"] + rec["waiting"] + [f["id"] for f in rec["finished"]])
        for key in sorted(set(ids) - seen.keys(), key=sample_sort_key):
            seen[key] = len(seen)
    return list(seen)


def _sample_of(request_id: str) -> str:
    """'3' -> '3#0' (sample 0 of request 3); '3#1' unchanged."""
    return request_id if "#" in request_id else f"{request_id}#0"


# ---------------------------------------------------------------------------------------- data
def _entry_state(entry: dict) -> str:
    kind = entry["kind"]
    if kind == "decode":
        return "decode"
    return f"{kind}_last" if entry["samples"] else kind


def step_states(rec: dict) -> dict[str, str]:
    """Sample -> its state in this step (a key of STATES); samples not in the step are absent."""
    states = {key: "waiting" for key in rec["waiting"]}
    states.update({key: "running" for key in rec["running"]})
    states.update({child: "forked" for _, child in rec["forked"]})
    states.update({e["id"]: _entry_state(e) for e in rec["scheduled"]})
    return states


@dataclass(frozen=True)
class Timeline:
    """What the timeline draws: `states[row][col]` (None: not in the engine at that step)."""

    samples: list[str]
    states: list[list[str | None]]
    preempted: list[tuple[int, int]]  # (row, col)
    finished: list[tuple[int, int]]
    prefix_hits: list[tuple[int, int]]  # admitted with tokens found in the prefix cache
    prefill_tokens: list[int]  # per col: tokens computed by prefill chunks
    recompute_tokens: list[int]  # by recompute chunks (a preempted sample's prompt and outputs)
    decode_tokens: list[int]
    padding_tokens: list[int]  # ref: positions computed for padding (num_scheduled - real)
    batch_sizes: list[int]  # samples that ran (scheduled + forked)


def timeline(steps: list[dict]) -> Timeline:
    samples = sample_order(steps)
    row = {key: i for i, key in enumerate(samples)}
    states: list[list[str | None]] = [[None] * len(steps) for _ in samples]
    preempted, finished, hits = [], [], []
    tokens: dict[str, list[int]] = {"prefill": [], "recompute": [], "decode": []}
    padding, batch = [], []
    for col, rec in enumerate(steps):
        for key, state in step_states(rec).items():
            states[row[key]][col] = state
        preempted += [(row[p["id"]], col) for p in rec["preempted"] if p["id"] in row]
        finished += [(row[f["id"]], col) for f in rec["finished"] if f["id"] in row]
        hits += [(row[e["id"]], col) for e in rec["scheduled"] if e["admitted"] and e["prefix_hit_tokens"]]
        for kind, per_step in tokens.items():
            per_step.append(sum(e["tokens"] for e in rec["scheduled"] if e["kind"] == kind))
        real = sum(e["tokens"] for e in rec["scheduled"])
        padding.append(max(0, rec["num_scheduled_tokens"] - real))
        batch.append(len(rec["scheduled"]) + len(rec["forked"]))
    return Timeline(samples, states, preempted, finished, hits, tokens["prefill"], tokens["recompute"],
                    tokens["decode"], padding, batch)


def used_slots(table_index: int, num_tokens: int, block_size: int) -> int:
    """Slots written in block `table_index` of a table covering `num_tokens` positions."""
    return max(0, min(block_size, num_tokens - table_index * block_size))


@dataclass(frozen=True)
class BlockState:
    owner: str  # the owner that appeared first (a prefix's or a fork's origin)
    num_owners: int
    used: int  # slots written (the most any owner has written)


def block_states(rec: dict, block_size: int) -> dict[int, BlockState]:
    """Block id -> its owners and fill after this step; blocks in no table are absent."""
    kv = rec["kv"]
    owners: dict[int, list[str]] = {}
    used: dict[int, int] = {}
    for key, table in kv["tables"].items():
        n = kv["num_tokens"].get(key, 0)
        for i, block in enumerate(table):
            owners.setdefault(block, []).append(key)
            used[block] = max(used.get(block, 0), used_slots(i, n, block_size))
    return {b: BlockState(min(keys, key=sample_sort_key), len(keys), used[b]) for b, keys in owners.items()}


def kv_utilization(meta: dict, steps: list[dict]) -> float | None:
    """Written slots / reserved slots over all steps (a ratio of sums). ref: its own accounting
    (`totals.kv_slot_steps_*`, equal to `get_metrics().kv_utilization`); fast: slots of the
    blocks in tables (a shared block counted once)."""
    if not steps:
        return None
    totals = steps[-1]["totals"]
    if "kv_slot_steps_reserved" in totals:
        reserved = totals["kv_slot_steps_reserved"]
        return totals["kv_slot_steps_used"] / reserved if reserved else None
    bs = meta["block_size"]
    used = reserved = 0
    for rec in steps:
        blocks = block_states(rec, bs)
        used += sum(b.used for b in blocks.values())
        reserved += len(blocks) * bs
    return used / reserved if reserved else None


def _fmt_rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return 0.0
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ---------------------------------------------------------------------------------------- summary
@dataclass(frozen=True)
class TraceStats:
    """The numbers `summary` prints, computed from the records alone."""

    engine: str
    num_steps: int
    num_samples: int
    prompt_tokens_computed: int
    generated_tokens: int
    mean_batch: float  # samples that ran per step
    max_batch: int
    mean_tokens: float  # tokens computed per step (ref: real tokens, padding left out)
    mean_padded_tokens: float  # positions the forward computed (ref's padding included)
    budget: int | None  # max_num_batched_tokens
    preemptions: int
    victims: dict[str, int]
    prefix_cache_hit_rate: float | None
    block_reuse_rate: float | None
    kv_usage_mean: float
    kv_usage_max: float
    kv_utilization: float | None
    step_ms_mean: float
    step_ms_p50: float
    step_ms_p90: float
    phase_share: dict[str, float]  # phase -> its share of the summed step time
    layer_ms: dict[str, float] | None  # layer -> summed ms (None: layers not timed)


def trace_stats(meta: dict, steps: list[dict]) -> TraceStats:
    if not steps:
        raise ValueError("the trace has no step records: nothing ran the model")
    last = steps[-1]
    totals = last["totals"]
    durations = [rec["duration_ms"] for rec in steps]
    phases: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    for rec in steps:
        phases.update(rec["phases_ms"])
        layers.update(rec["layers_ms"] or {})
    total_ms = sum(durations)
    batch = [len(rec["scheduled"]) + len(rec["forked"]) for rec in steps]
    real = [sum(e["tokens"] for e in rec["scheduled"]) for rec in steps]
    victims = Counter(p["id"] for rec in steps for p in rec["preempted"])
    usage = [rec["kv"]["usage"] for rec in steps]
    return TraceStats(
        engine=meta["engine"], num_steps=len(steps), num_samples=len(sample_order(steps)),
        prompt_tokens_computed=totals["prompt_tokens_computed"], generated_tokens=totals["generated_tokens"],
        mean_batch=sum(batch) / len(steps), max_batch=max(batch),
        mean_tokens=sum(real) / len(steps),
        mean_padded_tokens=sum(rec["num_scheduled_tokens"] for rec in steps) / len(steps),
        budget=meta.get("max_num_batched_tokens"),
        preemptions=sum(victims.values()), victims=dict(sorted(victims.items(), key=lambda kv: sample_sort_key(kv[0]))),
        prefix_cache_hit_rate=totals.get("prefix_cache_hit_rate") if last["prefix_cache"] is not None else None,
        block_reuse_rate=last["block_reuse_rate"]["cumulative"],
        kv_usage_mean=sum(usage) / len(usage), kv_usage_max=max(usage),
        kv_utilization=kv_utilization(meta, steps),
        step_ms_mean=total_ms / len(steps), step_ms_p50=_percentile(durations, 50),
        step_ms_p90=_percentile(durations, 90),
        phase_share={k: v / total_ms if total_ms else 0.0 for k, v in phases.items()},
        layer_ms=dict(layers) if meta.get("layers_timed") else None,
    )


def _title(meta: dict) -> str:
    budget = meta.get("max_num_batched_tokens")
    budget_text = f"budget {budget} tokens/step" if budget is not None else "no token budget (static batches)"
    return (f"{meta['engine']} engine · policy {meta['policy']} · block_size {meta['block_size']} · "
            f"{meta['num_blocks']} KV blocks · {budget_text} · max {meta['max_num_seqs']} seqs")


def summary(meta: dict, steps: list[dict]) -> str:
    """The trace in numbers, one fact per line."""
    s = trace_stats(meta, steps)
    budget = f"{s.budget}" if s.budget is not None else "none (static batch)"
    fill = f" ({s.mean_tokens / s.budget:.0%} of the budget)" if s.budget else ""
    victims = ", ".join(f"{k} x{n}" for k, n in s.victims.items()) or "none"
    lines = [
        f"trace: {_title(meta)}",
        f"steps: {s.num_steps} (samples seen: {s.num_samples})",
        f"tokens: {s.prompt_tokens_computed} prompt tokens computed, {s.generated_tokens} generated",
        f"batch: {s.mean_batch:.2f} samples/step on average, max {s.max_batch}",
        f"tokens per step: mean {s.mean_tokens:.2f}{fill}; budget {budget}",
    ]
    if s.mean_padded_tokens > s.mean_tokens:
        lines.append(f"positions computed per step, padding included: mean {s.mean_padded_tokens:.2f}")
    lines += [
        f"preemptions: {s.preemptions} (victims: {victims})",
        f"prefix cache hit rate: {_fmt_rate(s.prefix_cache_hit_rate)}",
        f"block reuse rate (cumulative): {_fmt_rate(s.block_reuse_rate)}",
        f"KV usage (blocks in use / pool): mean {s.kv_usage_mean:.3f}, max {s.kv_usage_max:.3f}",
        f"KV utilization (written slots / reserved slots, all steps): {_fmt_rate(s.kv_utilization)}",
        f"time per step: mean {s.step_ms_mean:.3f} ms, p50 {s.step_ms_p50:.3f} ms, p90 {s.step_ms_p90:.3f} ms",
        "time per phase: " + ", ".join(f"{k} {v:.1%}" for k, v in s.phase_share.items()),
    ]
    if s.layer_ms:
        total = s.step_ms_mean * s.num_steps
        lines.append("time per layer (nested inside the phases): "
                     + ", ".join(f"{k} {v / total:.1%}" for k, v in sorted(s.layer_ms.items(), key=lambda kv: -kv[1])))
    elif meta["engine"] == "fast":
        lines.append("time per layer: worker in another process: inner layers not timed")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- token path
@dataclass(frozen=True)
class TokenPath:
    """Where one output token was made and where its K/V went.

    `sampled_col` / `fed_col` index the step list; `fed_col` is None when the token is never fed
    back (the sample's last token, or the trace ends). `table`/`block`/`slot` are None when the
    fed step's record holds no table reaching the position (see `_table_at`).
    """

    sample: str
    index: int
    token_id: int
    num_prompt_tokens: int
    sampled_col: int
    fed_col: int | None
    table: list[int] | None
    block: int | None
    slot: int | None

    @property
    def position(self) -> int:
        return self.num_prompt_tokens + self.index


def sampled_tokens(steps: list[dict]) -> dict[str, dict[int, int]]:
    """Sample -> {output token index: the column of the step that sampled it}."""
    out: dict[str, dict[int, int]] = {}
    for col, rec in enumerate(steps):
        got = rec["sampled"]
        for e in rec["scheduled"]:
            if e["samples"] and got.get(e["id"], -1) >= 0:
                out.setdefault(e["id"], {})[e["num_output_tokens"]] = col
        for _, child in rec["forked"]:
            if got.get(child, -1) >= 0:
                out.setdefault(child, {})[0] = col
    return out


def _prompt_lengths(steps: list[dict]) -> dict[str, int]:
    lengths: dict[str, int] = {}
    for rec in steps:
        for e in rec["scheduled"]:
            lengths.setdefault(e["id"], e["num_prompt_tokens"])
        for parent, child in rec["forked"]:
            if parent in lengths:
                lengths.setdefault(child, lengths[parent])
    return lengths


def _pick_sample(order: list[str], made: dict[str, dict[int, int]], token_index: int | None) -> str:
    """The first sample whose token is also fed back (>= index + 2 tokens), else one with >= 3."""
    want = (2 if token_index is None else token_index) + 2
    for need in (want, 3, 1):
        for key in order:
            if len(made.get(key, {})) >= need:
                return key
    raise ValueError("no sample in the trace produced a token")


def _table_at(rec: dict, key: str, position: int, block_size: int) -> list[int] | None:
    """The sample's table in this step: after it, or, for a sample freed in it (finished or
    preempted), the table it had before (`block_changes.freed`); None if neither reaches
    `position` (the block was added and freed within the step: the record does not hold it)."""
    table = rec["kv"]["tables"].get(key) or rec["block_changes"].get(key, {}).get("freed")
    if table is None or len(table) <= position // block_size:
        return None
    return table


def find_token(meta: dict, steps: list[dict], request_id: str | None = None,
               token_index: int | None = None) -> TokenPath:
    """Locate output token `token_index` of a sample ('3' means '3#0') in the trace; defaults:
    the first sample that made enough tokens, token 2 (or its last)."""
    made = sampled_tokens(steps)
    order = sample_order(steps)
    key = _sample_of(request_id) if request_id is not None else _pick_sample(order, made, token_index)
    if key not in made:
        known = ", ".join(k for k in order if k in made)
        raise ValueError(f"request {request_id!r}: sample {key} produced no token in this trace; samples: {known}")
    indices = sorted(made[key])
    if token_index is None:
        token_index = 2 if 2 in made[key] else indices[-1]
    if token_index not in made[key]:
        raise ValueError(f"token {token_index} of sample {key} is not in the trace; it has tokens {indices[0]}..{indices[-1]}")
    col = made[key][token_index]
    prompt_len = _prompt_lengths(steps)[key]
    p = prompt_len + token_index
    bs = meta["block_size"]
    for fed in range(col + 1, len(steps)):
        entry = next((e for e in steps[fed]["scheduled"] if e["id"] == key), None)
        if entry is not None and entry["start"] <= p < entry["start"] + entry["tokens"]:
            table = _table_at(steps[fed], key, p, bs)
            if "blocks" in entry:  # fast records the blocks each step writes
                block = entry["blocks"][p // bs - entry["start"] // bs]
            else:
                block = None if table is None else table[p // bs]
            slot = None if block is None else block * bs + p % bs
            return TokenPath(key, token_index, steps[col]["sampled"][key], prompt_len, col, fed, table, block, slot)
    return TokenPath(key, token_index, steps[col]["sampled"][key], prompt_len, col, None, None, None, None)


@dataclass(frozen=True)
class Node:
    """One line of the tree: what ran, what it did for this token, how long (ms; None: untimed)."""

    label: str
    detail: str = ""
    ms: float | None = None
    children: tuple["Node", ...] = ()


def _tree_lines(node: Node, lead: str = "", branch: str = "") -> list[tuple[str, str, float | None]]:
    rows = [(lead + branch + node.label, node.detail, node.ms)]
    below = lead + ("│  " if branch == "├─ " else "   " if branch else "")
    for i, child in enumerate(node.children):
        last = i == len(node.children) - 1
        rows += _tree_lines(child, below, "└─ " if last else "├─ ")
    return rows


def format_tree(root: Node) -> str:
    rows = _tree_lines(root)
    w_label = max(len(r[0]) for r in rows) + 2
    w_detail = max(len(r[1]) for r in rows) + 2
    out = []
    for label, detail, ms in rows:
        time_text = "" if ms is None else f"{ms:8.3f} ms"
        out.append(f"{label:<{w_label}}{detail:<{w_detail}}{time_text}".rstrip())
    return "\n".join(out)


def _token_repr(token_id: int, token_text) -> str:
    if token_text is None:
        return ""
    text = token_text(token_id) if callable(token_text) else token_text.get(token_id)
    return "" if text is None else repr(text)


def _what_ran(rec: dict, key: str) -> tuple[str, dict | None]:
    """How this step served the sample, and its scheduled entry (None for a fork)."""
    entry = next((e for e in rec["scheduled"] if e["id"] == key), None)
    if entry is None:
        parent = next(p for p, c in rec["forked"] if c == key)
        return f"forked from {parent}: shares its full blocks, copies the partial last one", None
    a, b = entry["start"], entry["start"] + entry["tokens"]
    if entry["kind"] == "decode":
        what = f"decode 1 token (position {a})"
    elif entry["kind"] == "recompute":
        what = f"recompute positions [{a}, {b}) after preemption"
    else:
        what = f"prefill chunk [{a}, {b}) of {entry['num_prompt_tokens']} prompt tokens"
    if entry["prefix_hit_tokens"]:
        what += f", {entry['prefix_hit_tokens']} from the prefix cache"
    return what, entry


def _fast_tree(meta: dict, rec: dict, tp: TokenPath, text: str) -> Node:
    key, bs = tp.sample, meta["block_size"]
    what, entry = _what_ran(rec, key)
    budget = meta.get("max_num_batched_tokens")
    phases, layers = rec["phases_ms"], rec["layers_ms"]
    table = _table_at(rec, key, tp.position - 1, bs) or NOT_RECORDED
    n_batch = len(rec["scheduled"]) + len(rec["forked"])
    root_label = f"engine.step (step {rec['step']}: {n_batch} samples, {rec['num_scheduled_tokens']} tokens of {budget})"
    schedule = Node("Scheduler.schedule", f"{what}; budget {rec['num_scheduled_tokens']}/{budget}",
                    phases.get("schedule"), _schedule_children(rec, entry, layers, table))
    if layers is None:
        execute = Node("Executor.execute_model", "", phases.get("execute"),
                       (Node("(worker in another process: inner layers not timed)"),))
        update = Node("Scheduler.update_from_output + outputs", f"stop rules + detokenizer: {text}",
                      phases.get("update"))
        return Node(root_label, "", rec["duration_ms"], (schedule, execute, update))
    execute = Node("Executor.execute_model", "", phases.get("execute"),
                   _execute_children(meta, rec, tp, entry, table))
    finished = next((f["reason"] for f in rec["finished"] if f["id"] == key), None)
    detail = f"stop rules + detokenizer: {text}" + (f"; finished ({finished})" if finished else "")
    update_children = [Node("KVCacheManager.cache_full_blocks", "", layers.get("kv_cache_blocks"))]
    if "kv_free" in layers:
        why = "finished samples' blocks" + (" (and the preempted ones', freed in schedule)" if rec["preempted"] else "")
        update_children.append(Node("KVCacheManager.free", why, layers["kv_free"]))
    update = Node("Scheduler.update_from_output", detail, layers.get("update"), tuple(update_children))
    outputs = Node("outputs (RequestOutput)", "", layers.get("output"))
    return Node(root_label, "", rec["duration_ms"], (schedule, execute, update, outputs))


def _schedule_children(rec: dict, entry: dict | None, layers: dict | None, table) -> tuple[Node, ...]:
    if layers is None:
        return ()
    children = []
    if entry is not None and entry["admitted"]:
        children.append(Node("KVCacheManager.get_computed_blocks", f"prefix hit {entry['prefix_hit_tokens']} tokens",
                             layers.get("kv_lookup")))
    name = "KVCacheManager.fork" if entry is None else "KVCacheManager.allocate_slots"
    children.append(Node(name, f"table {table}", layers.get("kv_allocate")))
    return tuple(children)


def _execute_children(meta: dict, rec: dict, tp: TokenPath, entry: dict | None, table) -> tuple[Node, ...]:
    layers = rec["layers_ms"]
    # attention reads the tokens before the sampled one: tp.position of them
    reads = f"reads {tp.position} tokens from blocks {table}"
    if entry is None:  # a fork samples from its parent's row: it computes no position itself
        inputs = "none of its own: samples from its parent's logits"
        parent = next(p for p, c in rec["forked"] if c == tp.sample)
        reads = f"for its parent {parent}: reads {tp.position} tokens from blocks {rec['kv']['tables'].get(parent)}"
    else:
        a, b = entry["start"], entry["start"] + entry["tokens"]
        inputs = f"position {a}" if b == a + 1 else f"positions {a}..{b - 1}"
    forward = f"model forward ({meta['num_hidden_layers']} layers)"  # both trace writers record it
    children = [Node("ModelRunner.update_states + prepare", inputs, layers.get("runner_inputs"))]
    if rec["forked"]:
        children.append(Node("ModelRunner.copy_blocks", "forks' partial last blocks", layers.get("copy_blocks")))
    attention = Node("attention backend", reads, layers.get("attention"))
    children += [Node(forward, "", layers.get("model_forward"), (attention,)),
                 Node("compute_logits", "", layers.get("logits")),
                 Node("Sampler", f"-> token {tp.token_id}", layers.get("sampler"))]
    return tuple(children)


def _ref_row(rec: dict, key: str) -> int:
    """The sample's row in ref's static batch: the rank of its first virtual block."""
    firsts = sorted(table[0] for table in rec["kv"]["tables"].values() if table)
    return firsts.index(rec["kv"]["tables"][key][0])


def _ref_tree(meta: dict, rec: dict, tp: TokenPath, text: str) -> Node:
    key = tp.sample
    entry = next(e for e in rec["scheduled"] if e["id"] == key)
    rows = len(rec["kv"]["tables"])
    kind = entry["kind"]
    if kind == "prefill":
        longest = max(e["tokens"] for e in rec["scheduled"])
        what = f"prefill the whole prompt [0, {entry['tokens']}), right-padded to {longest}"
    else:
        what = f"decode 1 token (position {entry['start']})"
    row = _ref_row(rec, key)
    root = f"ref LLMEngine.step (step {rec['step']}: {kind} of the static batch, {rows} rows, {rec['num_scheduled_tokens']} positions)"
    inner = (Node("model forward (every row, one contiguous KV cache)",
                  f"row {row}: {what}; attention reads its {tp.position} tokens"),
             Node("sampler + stop rules", f"-> {text}"),
             Node("(ref is not timed inside the step: layers_ms is null)"))
    phases = tuple(Node(f"{name} of the static batch", "", ms, inner) for name, ms in rec["phases_ms"].items())
    return Node(root, "", rec["duration_ms"], phases or inner)


def _fed_line(meta: dict, steps: list[dict], tp: TokenPath) -> str:
    if tp.fed_col is None:
        done = any(f["id"] == tp.sample for rec in steps[tp.sampled_col:] for f in rec["finished"])
        return ("the token is never fed back: it is the sample's last" if done
                else "the trace ends before the token is fed back")
    rec, bs, p = steps[tp.fed_col], meta["block_size"], tp.position
    head = f"step {rec['step']}: the token is the input at position {p}"
    if tp.slot is None:
        return head + " (the record holds no table reaching it: the block was added and freed in that step)"
    where = f"block {tp.block}, slot {tp.block}*{bs}+{p % bs} = {tp.slot}"
    if meta["engine"] == "ref":
        return f"{head} -> contiguous cache row {_ref_row(rec, tp.sample)}, slot {p} of the row (virtual {where})"
    return f"{head} -> {where}"


def token_path(meta: dict, steps: list[dict], request_id: str | None = None, token_index: int | None = None,
               token_text: Callable[[int], str | None] | Mapping[int, str] | None = None) -> str:
    """One output token's path through the engine as an indented tree of the step that sampled it,
    with the step's recorded timings, then where its K/V was written when fed back."""
    tp = find_token(meta, steps, request_id, token_index)
    rec = steps[tp.sampled_col]
    text = _token_repr(tp.token_id, token_text)
    rid = tp.sample.rpartition("#")[0]
    fed = "" if tp.fed_col is None else f", its KV written at step {steps[tp.fed_col]['step']}"
    head = f"token {tp.index} of request {rid} (sample {tp.sample}): id {tp.token_id} {text}".rstrip()
    shown = text or f"token {tp.token_id}"
    tree = _ref_tree(meta, rec, tp, shown) if meta["engine"] == "ref" else _fast_tree(meta, rec, tp, shown)
    n_batch = len(rec["scheduled"]) + len(rec["forked"])
    note = (f"(times are the whole step's, shared by all {n_batch} samples in its batch; "
            "inner times nest inside the phases and are host wall-clock)")
    return "\n".join([f"{head}   [sampled at step {rec['step']}{fed}]", format_tree(tree),
                      _fed_line(meta, steps, tp), note]) + "\n"


# ---------------------------------------------------------------------------------------- pictures
def _figure(height_in: float):
    """A matplotlib Figure on an Agg canvas (no pyplot: no global state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("fast.trace.render draws with matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(FIG_WIDTH_IN, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _rgb(colour: str) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return to_rgb(colour)


def _owner_colours(samples: list[str]) -> dict[str, tuple[float, float, float]]:
    """A stable colour per sample (order of first appearance), cycled. Saturated colours only:
    the pale tints mean "allocated, not yet written", grey means free."""
    from matplotlib import colormaps

    tab10, dark2 = colormaps["tab10"], colormaps["Dark2"]
    palette = [tab10(i)[:3] for i in range(10) if i != 7] + [dark2(i)[:3] for i in range(7)]  # no greys
    return {key: palette[i % len(palette)] for i, key in enumerate(samples)}


def _cap_note(what: str, shown: int, total: int) -> str:
    return f"; first {shown} of {total} {what} drawn" if total > shown else ""


def timeline_png(meta: dict, steps: list[dict], path) -> Path:
    """Samples x steps coloured by state, markers for preemptions and finishes; below it the
    tokens per step (prefill / decode / padding) against the budget, and the batch size."""
    import numpy as np

    tl = timeline(steps)
    rows, cols = min(len(tl.samples), MAX_ROWS_DRAWN), min(len(steps), MAX_STEPS_DRAWN)
    grid = np.ones((rows, cols, 3))
    for r in range(rows):
        for c in range(cols):
            state = tl.states[r][c]
            if state is not None:
                grid[r, c] = _rgb(STATES[state][0])
    fig = _figure(min(14.0, 2.6 + 0.2 * rows + 2.4))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [max(2.0, 0.2 * rows), 2.2]})
    top.imshow(grid, aspect="auto", interpolation="nearest", extent=(-0.5, cols - 0.5, rows - 0.5, -0.5))
    _markers(top, tl.preempted, rows, cols, dict(marker="x", color="#d7191c", s=40, linewidths=1.8))
    _markers(top, tl.finished, rows, cols, dict(marker="|", color="black", s=60, linewidths=2.2))
    _markers(top, tl.prefix_hits, rows, cols, dict(marker="D", facecolor="#ffd92f", edgecolor="black", s=22,
                                                   linewidths=0.6))
    top.set_yticks(range(rows), tl.samples[:rows], fontsize=7 if rows > 30 else 8)
    top.set_ylabel("sample (request#index)")
    top.set_title(_title(meta) + _cap_note("samples", rows, len(tl.samples)) + _cap_note("steps", cols, len(steps)),
                  fontsize=9)
    _timeline_legend(top)
    _budget_panel(bottom, meta, tl, cols)
    fig.suptitle("Timeline: what each sample did at each engine step", fontsize=12, y=0.995)
    fig.subplots_adjust(left=0.07, right=0.79, top=1 - 0.75 / fig.get_figheight(), bottom=0.5 / fig.get_figheight(),
                        hspace=0.06)
    fig.savefig(path)
    return Path(path)


def _markers(ax, cells: list[tuple[int, int]], rows: int, cols: int, style: dict) -> None:
    cells = [(r, c) for r, c in cells if r < rows and c < cols]
    if cells:
        ax.scatter([c for _, c in cells], [r for r, _ in cells], zorder=3, **style)


def _timeline_legend(ax) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=colour, edgecolor="#888888", label=label) for colour, label in STATES.values()]
    handles += [Line2D([], [], marker="x", color="#d7191c", linestyle="", markersize=7, label="preempted (blocks freed)"),
                Line2D([], [], marker="|", color="black", linestyle="", markersize=9, markeredgewidth=2,
                       label="finished (at this step)"),
                Line2D([], [], marker="D", markerfacecolor="#ffd92f", markeredgecolor="black", linestyle="",
                       markersize=5, label="admitted with a prefix-cache hit"),
                Patch(facecolor="white", edgecolor="#888888", label="blank: not arrived / done")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _budget_panel(ax, meta: dict, tl: Timeline, cols: int) -> None:
    x = list(range(cols))
    base = [0] * cols
    layers = [(tl.prefill_tokens, STATES["prefill_last"][0], "prefill tokens"),
              (tl.recompute_tokens, STATES["recompute_last"][0], "recompute tokens"),
              (tl.decode_tokens, STATES["decode"][0], "decode tokens")]
    for values, colour, label in layers:
        if any(values[:cols]):
            ax.bar(x, values[:cols], width=0.9, bottom=base, color=colour, label=label)
            base = [b + v for b, v in zip(base, values)]
    if any(tl.padding_tokens[:cols]):
        ax.bar(x, tl.padding_tokens[:cols], width=0.9, bottom=base, color="#eeeeee", edgecolor="#999999",
               hatch="///", linewidth=0.3, label="padding (ref)")
        base = [b + v for b, v in zip(base, tl.padding_tokens)]
    budget = meta.get("max_num_batched_tokens")
    if budget is not None:
        ax.axhline(budget, color="black", linestyle="--", linewidth=1, label=f"budget {budget} tokens/step")
    ax.set_ylim(0, 1.12 * max(base + [budget or 0, 1]))
    ax.set_ylabel("tokens / step")
    ax.set_xlabel("engine step")
    ax.set_xlim(-0.5, cols - 0.5)
    twin = ax.twinx()
    twin.step(x, tl.batch_sizes[:cols], where="mid", color="#762a83", linewidth=1.4, label="batch size (samples)")
    twin.set_ylabel("samples / step", color="#762a83")
    twin.set_ylim(0, max(tl.batch_sizes[:cols] + [1]) * 1.15)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.07, 1.0), fontsize=8, frameon=False)


def block_map_png(meta: dict, steps: list[dict], path) -> Path:
    """KV blocks x steps: owner colour, written vs allocated-but-unwritten slots (the block's
    stripes), shared blocks dotted, free blocks that still hold a prefix-cache key striped grey."""
    bs = meta["block_size"]
    nb, cols = _blocks_drawn(meta, steps), min(len(steps), MAX_STEPS_DRAWN)
    samples = sample_order(steps)
    colours = _owner_colours(samples)
    image, shared = _block_image(steps[:cols], nb, bs, colours)
    fig = _figure(min(14.0, max(6.0, 2.0 + nb * 0.09)))
    ax, side = fig.subplots(1, 2, gridspec_kw={"width_ratios": [5, 1.25]})
    ax.imshow(image, aspect="auto", interpolation="nearest", extent=(-0.5, cols - 0.5, nb - 0.5, -0.5))
    if shared:
        ax.scatter([c for _, c in shared], [b for b, _ in shared], marker="o", s=10, facecolor="black",
                   edgecolor="white", linewidths=0.5, zorder=3)
    ax.set_xlabel("engine step")
    ax.set_ylabel("KV block id" + (" (ref: virtual blocks of each row's reservation)" if meta["engine"] == "ref" else ""))
    ax.set_xlim(-0.5, cols - 0.5)
    ax.yaxis.get_major_locator().set_params(integer=True)
    if nb <= 96:  # thin lines between blocks: neighbours of one owner stay apart
        ax.hlines([b + 0.5 for b in range(nb - 1)], -0.5, cols - 0.5, colors="white", linewidth=0.4)
    util = kv_utilization(meta, steps)
    reuse = steps[-1]["block_reuse_rate"]["cumulative"] if steps else None
    unused = f"; blocks {nb}..{meta['num_blocks'] - 1} never used, not drawn" if nb < min(meta["num_blocks"], MAX_BLOCKS_DRAWN) else ""
    blocks_note = unused or _cap_note("blocks", nb, meta["num_blocks"])
    ax.set_title(_title(meta) + blocks_note + _cap_note("steps", cols, len(steps)), fontsize=9)
    fig.suptitle(f"KV block map: who holds each block after each step  ·  block reuse rate (cumulative) "
                 f"{_fmt_rate(reuse)}", fontsize=12)
    fig.text(0.07, 0.01, _utilization_caption(meta, util), fontsize=9)
    _block_side_panel(side, meta, samples, colours, reuse, util)
    fig.subplots_adjust(left=0.07, right=0.98, top=1 - 0.75 / fig.get_figheight(), bottom=0.75 / fig.get_figheight(),
                        wspace=0.03)
    fig.savefig(path)
    return Path(path)


def _blocks_drawn(meta: dict, steps: list[dict]) -> int:
    """The whole pool when it is small (its free part is part of the story); of a large pool,
    the blocks up to the highest id ever used (the pool hands out low ids first), capped."""
    if meta["num_blocks"] <= MAX_BLOCKS_DRAWN:
        return meta["num_blocks"]
    highest = max((b for rec in steps for t in [*rec["kv"]["tables"].values(), rec["kv"]["cached"]] for b in t),
                  default=0)
    return min(MAX_BLOCKS_DRAWN, highest + 1)


def _utilization_caption(meta: dict, util: float | None) -> str:
    if meta["engine"] == "ref":
        return (f"KV utilization (written slots / reserved slots, averaged over steps): {_fmt_rate(util)}"
                f" - ref reserves prompt + max_tokens per row up front; the pale part is reserved, never yet written")
    return (f"KV utilization (written slots / slots of allocated blocks, averaged over steps): {_fmt_rate(util)}"
            f" - only each table's last block is partly empty")


def _block_image(steps: list[dict], nb: int, bs: int, colours: dict):
    """RGB image of nb * sub rows (a block is `sub` stripes of its slots) x steps, and the
    (block, col) cells of shared blocks."""
    import numpy as np

    sub = min(bs, MAX_SUB_ROWS)
    image = np.ones((nb * sub, len(steps), 3))
    cached = [np.array(_rgb(c)) for c in CACHED_COLOURS]
    shared = []
    for col, rec in enumerate(steps):
        states = block_states(rec, bs)
        cached_ids = set(rec["kv"]["cached"])
        for b in range(nb):
            rows = slice(b * sub, (b + 1) * sub)
            state = states.get(b)
            if state is None:
                if b in cached_ids:
                    image[rows, col] = [cached[j % 2] for j in range(sub)]
                continue
            image[rows, col] = _block_stripes(np.array(colours[state.owner]), state.used, bs, sub)
            if state.num_owners > 1:
                shared.append((b, col))
    return image, shared


def _block_stripes(colour, used: int, bs: int, sub: int):
    """`sub` stripes: written slots in the owner's colour, the rest pale and hatched."""
    import numpy as np

    written = math.ceil(used * sub / bs)  # one written slot shows as at least one stripe
    stripes = np.empty((sub, 3))
    for j in range(sub):
        alpha = 1.0 if j < written else UNUSED_ALPHA[j % 2]
        stripes[j] = alpha * colour + (1 - alpha) * 1.0
    return stripes


def _block_side_panel(ax, meta: dict, samples: list[str], colours: dict, reuse, util) -> None:
    from matplotlib.patches import Patch

    ax.axis("off")
    bs = meta["block_size"]
    pale = tuple(UNUSED_ALPHA[1] * c + (1 - UNUSED_ALPHA[1]) for c in colours[samples[0]]) if samples else "#dddddd"
    handles = [
        Patch(facecolor=colours[samples[0]] if samples else "#888888", label="written slots (colour = owner)"),
        Patch(facecolor=pale, label="allocated/reserved, not yet written"),
        Patch(facecolor="black", edgecolor="white", label="dot: shared (in > 1 table)"),
        Patch(facecolor=CACHED_COLOURS[0], hatch="---", edgecolor=CACHED_COLOURS[1],
              label="free, cached (evictable)"),
        Patch(facecolor=FREE_COLOUR, edgecolor="#999999", label="free"),
    ]
    legend = ax.legend(handles=handles, loc="upper left", fontsize=8, frameon=False, title="cells",
                       title_fontsize=9)
    ax.add_artist(legend)
    owners = [Patch(facecolor=colours[k], label=k) for k in samples[:24]]
    if owners:
        ax.legend(handles=owners, loc="upper left", bbox_to_anchor=(0.0, 0.62), fontsize=7, frameon=False,
                  ncol=2, title="owner" + ("" if len(samples) <= 24 else f" (first 24 of {len(samples)})"),
                  title_fontsize=9)
    facts = [f"block reuse rate\n(cumulative): {_fmt_rate(reuse)}",
             f"KV utilization: {_fmt_rate(util)}",
             f"{meta['num_blocks']} blocks x {bs} slots"]
    ax.text(0.0, 0.0, "\n".join(facts), fontsize=9, va="bottom", transform=ax.transAxes)


# ---------------------------------------------------------------------------------------- all
def render_all(meta: dict, steps: list[dict], out_dir, request_id: str | None = None,
               token_index: int | None = None, token_text=None) -> dict[str, Path]:
    """timeline.png, block_map.png, token_path.txt and summary.txt in `out_dir` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"timeline": timeline_png(meta, steps, out / "timeline.png"),
             "block_map": block_map_png(meta, steps, out / "block_map.png")}
    files["token_path"] = out / "token_path.txt"
    files["token_path"].write_text(token_path(meta, steps, request_id, token_index, token_text), encoding="utf-8")
    files["summary"] = out / "summary.txt"
    files["summary"].write_text(summary(meta, steps), encoding="utf-8")
    return files
