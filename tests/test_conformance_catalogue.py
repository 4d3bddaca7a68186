"""The planted-bug catalogue: realistic single defects in `fast`, each of which the suite must
catch with a message that names what broke.

Each entry is a source diff (tests/planting.py applies it to this process's `fast`), the check
that must fail, and a pattern its message must contain. The defects are the kind a person
makes — an off-by-one, a wrong boundary, a swapped order, a shared generator, a skipped copy —
across the runner, the model, the sampler and the engine's bookkeeping. (Allocator, scheduler
and kernel defects have their own planted tests beside the checks that catch them.)

A defect the suite misses is listed in BLIND with the reason: a strict xfail, so the day a
check learns to catch it the test flips and the entry must move to CATALOGUE.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from conformance.adapters import FastAdapter
from conformance.runner import run_check
from conformance.tiers import CHECKS, MAX_MODEL_LEN, Context, Profile
from tests.planting import plant

PROFILE = Profile("catalogue", examples=12, max_requests=10, stateful_steps=30, families=False, kernel_max_seq_len=64)


@dataclass(frozen=True)
class Bug:
    id: str
    module: str
    old: str
    new: str
    check: str  # "tier/check"
    match: str  # regex the failure message must contain


CATALOGUE = [
    # ---------------------------------------------------------------- sampler
    # Sampler defects are judged by the sampler tier, which draws ten times the examples of a
    # profile for the cost of one e2e example; e2e workloads catch most of them too, but not on
    # every draw (a random model's logits seldom sit where a boundary matters).
    Bug("temperature-applied-twice", "fast.worker.sampler",
        "logits = logits / torch.tensor([p.temperature for p in params])[:, None]",
        "logits = logits / torch.tensor([p.temperature ** 2 for p in params])[:, None]",
        "sampler/edges_vs_oracle", "sampler row"),
    Bug("top-k-keeps-one-extra", "fast.worker.sampler",
        "kth_index = torch.tensor([max(k, 1) - 1 for k in top_k])[:, None]",
        "kth_index = torch.tensor([min(max(k, 1), V - 1) for k in top_k])[:, None]",
        "sampler/edges_vs_oracle", "sampler row"),
    Bug("min-p-not-relative-to-the-top", "fast.worker.sampler",
        "drop = (probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values) & (min_p > 0)[:, None]",
        "drop = (probs < min_p[:, None]) & (min_p > 0)[:, None]",
        "sampler/edges_vs_oracle", "sampler row"),
    Bug("top-p-drops-the-crossing-token", "fast.worker.sampler",
        "mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs",
        "mass_before = torch.cumsum(sorted_probs, dim=-1)",
        "sampler/edges_vs_oracle", "sampler row"),
    Bug("presence-penalty-counts-the-prompt", "fast.worker.sampler",
        "x = x - pres * seen_out.float()", "x = x - pres * (seen_out | seen_prompt).float()",
        "sampler/edges_vs_oracle", "sampler row"),
    Bug("frequency-penalty-sign", "fast.worker.sampler",
        "x = x - freq * out_counts", "x = x + freq * out_counts",
        "sampler/edges_vs_oracle", "sampler row"),
    Bug("repetition-penalty-ignores-the-prompt", "fast.worker.sampler",
        "x = torch.where(seen_out | seen_prompt, penalized, x)", "x = torch.where(seen_out, penalized, x)",
        "sampler/edges_vs_oracle", "sampler row"),
    Bug("one-generator-for-the-batch", "fast.worker.sampler",
        "noise[j].exponential_(generator=r.generator)", "noise[j].exponential_(generator=rows[0].generator)",
        "sampler/edges_vs_oracle", "sampler row"),
    # End-to-end workloads on a random model seldom reach these two (a seen token with a negative
    # logit near the top; EOS as the favourite within min_tokens): the sampler tier builds such
    # logits on purpose (conformance/sampling.py).
    Bug("repetition-penalty-divides-negative-logits", "fast.worker.sampler",
        "penalized = torch.where(x > 0, x / rep, x * rep)", "penalized = x / rep",
        "sampler/edges_vs_oracle", "sampler row"),
    Bug("min-tokens-forgets-eos", "fast.worker.sampler",
        "stop = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))",
        "stop = list(p.stop_token_ids)",
        "sampler/edges_vs_oracle", "sampler row"),
    Bug("logprobs-of-processed-logits", "fast.worker.sampler",
        "entries, sampled_lp = self._logprobs(raw, rows, token_list)",
        "entries, sampled_lp = self._logprobs(logits, rows, token_list)",
        "e2e/workloads_vs_oracle", "logprob"),
    Bug("greedy-ignores-penalties", "fast.worker.sampler",
        "tokens = torch.argmax(logits, dim=-1)  # greedy rows keep this",
        "tokens = torch.argmax(raw, dim=-1)  # greedy rows keep this",
        "sampler/edges_vs_oracle", "sampler row"),
    # ---------------------------------------------------------------- model runner
    # (A uniform shift of every position is invisible under RoPE, which sees only differences.)
    Bug("positions-restart-each-chunk", "fast.worker.model_runner",
        "positions += range(start, end)", "positions += range(0, end - start)",
        "e2e/workloads_vs_oracle", "request"),
    Bug("samples-from-the-first-row-of-a-chunk", "fast.worker.model_runner",
        "sample_rows.append(len(ids) - 1)", "sample_rows.append(len(ids) - (end - start))",
        "e2e/workloads_vs_oracle", "request"),
    Bug("fork-skips-the-partial-block-copy", "fast.worker.model_runner",
        "        if not copies:\n            return\n", "        return\n",
        "e2e/workloads_vs_oracle", "request"),
    # ---------------------------------------------------------------- model
    Bug("silu-on-the-wrong-half", "fast.worker.model",
        "act = F.silu(gate_up[:, : layer.inter], inplace=True).mul_(gate_up[:, layer.inter:])",
        "act = F.silu(gate_up[:, layer.inter:], inplace=True).mul_(gate_up[:, : layer.inter])",
        "model/logits_vs_transformers", "logits"),
    Bug("rope-sin-sign", "fast.worker.model",
        "q = q * cos + rotate_half(q) * sin  # [N, Hq, D]", "q = q * cos - rotate_half(q) * sin  # [N, Hq, D]",
        "model/logits_vs_transformers", "logits"),
    Bug("no-final-norm", "fast.worker.model",
        "return rms_norm(x, self.final_norm, self.eps)", "return x",
        "model/logits_vs_transformers", "logits"),
    Bug("attention-scale-sqrt-missing", "fast.worker.model",
        "self.scale = config.head_dim ** -0.5", "self.scale = config.head_dim ** -1.0",
        "model/logits_vs_transformers", "logits"),
    # ---------------------------------------------------------------- engine bookkeeping
    Bug("prompt-logprobs-score-the-same-token", "fast.worker.model_runner",
        "logprob_entry(lp[j], st.token_ids[p + 1], top[j])", "logprob_entry(lp[j], st.token_ids[p], top[j])",
        "e2e/workloads_vs_oracle", "prompt"),
    Bug("cumulative-logprob-not-summed", "fast.core.scheduler",
        "r.cumulative_logprob += entry[token].logprob", "r.cumulative_logprob = entry[token].logprob",
        "e2e/workloads_vs_oracle", "cumulative"),
    Bug("forked-children-skip-their-first-sample", "fast.worker.model_runner",
        "for sampler in (st, *children.get(req_id, ())):", "for sampler in (st,):",
        "e2e/workloads_vs_oracle", "query_len"),
    # ---------------------------------------------------------------- request checks (SPEC §4)
    Bug("n-checked-against-twice-max-n", "ref.inputs",
        "if params.n > limits.max_n:", "if params.n > 2 * limits.max_n:",
        "robustness/bad_requests_rejected", "bad n"),
    Bug("surrogates-reach-the-tokenizer", "ref.inputs",
        'prompt.encode("utf-8")', 'prompt.encode("utf-8", "surrogatepass")',
        "robustness/bad_requests_rejected", "bad prompt"),
    Bug("abort-leaves-queued-samples", "fast.engine.llm_engine",
        "            self.scheduler.remove_all(queued)\n", "            self.scheduler.remove_all(queued[:1])\n",
        "robustness/abort_frees_everything", "free every block"),
]

# Defects the suite does not catch yet, and why (numbers from the catalogue's own runs).
BLIND: list[tuple[Bug, str]] = []


def run(check: str, model_dir: str):
    tier, name = check.split("/")
    chosen = next(c for c in CHECKS if c.tier == tier and c.name == name)
    make = lambda d, **o: FastAdapter(d, **o)  # noqa: E731
    ctx = Context(adapter=make(model_dir, max_model_len=MAX_MODEL_LEN), model_dir=model_dir, profile=PROFILE,
                  make_adapter=make)
    return run_check(chosen, ctx, seed=1234, shrink=False, replay="")


def test_the_catalogue_is_large_and_distinct():
    ids = [b.id for b in CATALOGUE] + [b.id for b, _ in BLIND]
    assert len(set(ids)) == len(ids)
    assert len(CATALOGUE) >= 20
    assert all(b.match for b in CATALOGUE), "every entry names what its failure message must say"


@pytest.mark.parametrize("check", sorted({b.check for b in CATALOGUE}))
def test_the_clean_engine_passes_every_check_the_catalogue_uses(check, tiny_model_dir):
    """Else a planted bug could 'fail' a check for a reason of its own (e.g. a coverage minimum)."""
    result = run(check, tiny_model_dir)
    assert result.status == "passed", result.message[:2000]


@pytest.mark.parametrize("bug", CATALOGUE, ids=lambda b: b.id)
def test_planted_bug_is_caught(bug: Bug, tiny_model_dir, monkeypatch):
    plant(monkeypatch, bug.module, bug.old, bug.new)
    result = run(bug.check, tiny_model_dir)
    assert result.status == "failed", f"{bug.id}: {bug.check} {result.status} with the bug planted"
    assert bug.match.lower() in result.message.lower(), f"{bug.id}: message does not name it:\n{result.message[:2000]}"


@pytest.mark.parametrize("bug,why", BLIND, ids=lambda x: x.id if isinstance(x, Bug) else "")
@pytest.mark.xfail(strict=True, reason="a known blind spot of the suite (see BLIND)")
def test_known_blind_spot(bug: Bug, why: str, tiny_model_dir, monkeypatch):
    plant(monkeypatch, bug.module, bug.old, bug.new)
    assert run(bug.check, tiny_model_dir).status == "failed"
