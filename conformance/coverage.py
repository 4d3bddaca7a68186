"""What a run of the suite actually exercised, and the minimums a profile must reach.

A property that passes on examples that never reached a feature proves nothing about it. Each
example of the end-to-end checks reports the features it hit; the runner prints the counts in
the table and the JSON report, and a profile whose minimums are not met fails with the list of
features it missed (so a weakened generator cannot pass silently).

Features come from three places, none of them trusted to the engine's word alone where the
request itself can tell: the outputs checked against the requests (stop kinds, length limits),
the engine options of the example (backend, dtype, chunking), and the engine's metrics
(preemptions, prefix hits, an abort after which the KV usage fell: "abort:blocks_held"; those an
engine could lie about, so they only *add* coverage — a missing metric counts as not exercised).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

# End-to-end examples that must hit each feature, in the quick profile (full: x2, deep: x5).
# Required: what the workload generator puts within reach of every engine on any seed, and the
# stop kinds, which a random model's output reaches on some seeds only: the e2e tier's targeted
# stop workloads (one per unit of PROFILE_SCALE) end requests on a stop token, a stop string and
# EOS by construction from the greedy oracle's output (tiers._stop_workloads).
E2E_MINIMUMS = {"length:max_tokens": 1, "length:max_model_len": 1, "n>1": 1, "logprobs": 1,
                "prompt_logprobs": 1, "stop:token": 1, "stop:string": 1, "stop:eos": 1}
# Only an engine the suite drives step by step, with its options drawn, shows these.
ENGINE_MINIMUMS = {"abort": 1, "preemption": 1, "prefix_hit": 1, "chunked_prefill:off": 1}
# Not scaled with the profile: one targeted case each guarantees them. Random draws add more by
# chance: about one example in six each for the dtypes; for an abort while the request holds
# blocks, as the engine's scheduling has it run or not at the drawn step (0 to 4 per profile seen).
ENGINE_FIXED_MINIMUMS = {"dtype:float16": 1, "dtype:bfloat16": 1, "abort:blocks_held": 1}
PROFILE_SCALE = {"quick": 1, "full": 2, "deep": 5}


def e2e_minimums(profile: str, engine_metrics: bool, stop_string: bool = True, eos: bool = True) -> dict[str, int]:
    """The e2e minimums of a profile; `engine_metrics` for an engine the suite drives step by step;
    without a tokenizer (`stop_string`) or EOS tokens (`eos`) the model cannot show that stop kind."""
    scale = PROFILE_SCALE.get(profile, 1)
    wanted = {k: v * scale for k, v in {**E2E_MINIMUMS, **(ENGINE_MINIMUMS if engine_metrics else {})}.items()}
    if engine_metrics:
        wanted.update(ENGINE_FIXED_MINIMUMS)
    if not stop_string:
        wanted.pop("stop:string")
    if not eos:
        wanted.pop("stop:eos")
    return wanted


@dataclass
class Coverage:
    """Examples per feature, for one check or merged over a run."""

    minimums: dict[str, int] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    examples: int = 0

    def record(self, features: Iterable[str]) -> None:
        """One example's features (each counted once per example)."""
        self.examples += 1
        self.counts.update(set(features))

    def merge(self, other: "Coverage") -> None:
        self.counts.update(other.counts)
        self.examples += other.examples

    def missing(self) -> dict[str, tuple[int, int]]:
        """feature -> (hit, required) for every minimum not met."""
        return {f: (self.counts[f], n) for f, n in self.minimums.items() if self.counts[f] < n}

    def check_minimum(self) -> None:
        missing = self.missing()
        if missing:
            listed = ", ".join(f"{f} ({hit} of {need})" for f, (hit, need) in sorted(missing.items()))
            raise AssertionError(f"features never exercised enough (coverage minimum, {self.examples} examples): "
                                 f"{listed}")

    def as_dict(self) -> dict[str, int]:
        return {"examples": self.examples, **dict(sorted(self.counts.items()))}


def output_features(prompt_ids: list[int], params, output, max_model_len: int,
                    eos_token_ids: tuple[int, ...]) -> set[str]:
    """What one finished request shows by itself: stop kinds, length limits, n, logprobs."""
    feats: set[str] = set()
    if params.n > 1:
        feats.add("n>1")
    if params.logprobs is not None:
        feats.add("logprobs")
    if params.prompt_logprobs is not None:
        feats.add("prompt_logprobs")
    if params.min_tokens:
        feats.add("min_tokens")
    if not params.greedy:
        feats.add("seeded" if params.seed is not None else "unseeded")
    for c in output.outputs:
        n = len(c.token_ids)
        if c.finish_reason == "stop":
            if isinstance(c.stop_reason, str):
                feats.add("stop:string")
            elif c.stop_reason is not None:
                feats.add("stop:token")
            elif n and c.token_ids[-1] in eos_token_ids:
                feats.add("stop:eos")
        elif c.finish_reason == "length":
            if len(prompt_ids) + n >= max_model_len:
                feats.add("length:max_model_len")
            if params.max_tokens is not None and n >= params.max_tokens:
                feats.add("length:max_tokens")
    return feats


def option_features(options: dict[str, Any]) -> set[str]:
    """The engine configuration of an example."""
    feats = {f"backend:{options.get('attention_backend', 'auto')}", f"dtype:{options.get('dtype', 'auto')}",
             f"chunked_prefill:{'off' if options.get('enable_chunked_prefill') is False else 'on'}",
             f"prefix_caching:{'off' if options.get('enable_prefix_caching') is False else 'on'}",
             f"policy:{options.get('policy', 'fcfs')}"}
    return feats


def metric_features(metrics: Any) -> set[str]:
    """From an engine's `get_metrics()` after the workload (absent fields add nothing)."""
    feats = set()
    if getattr(metrics, "num_preemptions", 0):
        feats.add("preemption")
    if getattr(metrics, "prefix_cache_hit_rate", 0.0):
        feats.add("prefix_hit")
    return feats


@dataclass
class RequiredCoverage:
    """Per key (a backend, a state machine), how often each item (a kernel path, an allocator
    event) was reached, against the items each key must reach. Subclasses name what is counted."""

    NEVER: ClassVar[str] = "items never reached"  # the failure message's subject

    required: dict[str, tuple[str, ...]] = field(default_factory=dict)
    reached: dict[str, Counter] = field(default_factory=dict)

    def record(self, key: str, items: Iterable[str] | Counter) -> None:
        self.reached.setdefault(key, Counter()).update(items)

    def unreached(self) -> dict[str, list[str]]:
        missing = {k: [i for i in items if not self.reached.get(k, Counter())[i]]
                   for k, items in self.required.items()}
        return {k: items for k, items in missing.items() if items}

    def check_minimum(self) -> None:
        """Raise naming every required item that its key never reached."""
        missing = self.unreached()
        if missing:
            listing = "; ".join(f"{k}: {', '.join(items)}" for k, items in sorted(missing.items()))
            raise AssertionError(f"{self.NEVER} (coverage minimum): {listing}")

    def as_dict(self) -> dict[str, int]:
        """"key: item" -> times reached, for a report."""
        return {f"{k}: {i}": n for k, c in sorted(self.reached.items()) for i, n in sorted(c.items()) if n}
