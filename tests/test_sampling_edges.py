"""conformance/sampling.py: fast's batched sampler equals the oracle's on edge-case logits, and
the check catches sampler defects that end-to-end workloads on a random model rarely reach."""

from __future__ import annotations

import pytest
from hypothesis import Phase, given, settings

from conformance.sampling import EOS, check_sampler, fast_sample, sampler_batches
from tests.planting import plant


@given(batch=sampler_batches())
@settings(max_examples=100)
def test_fast_sampler_equals_the_oracle_at_the_edges(batch):
    logits, rows = batch
    check_sampler(fast_sample, logits, rows, EOS)


EDGE_BUGS = [
    ("repetition penalty divides negative logits",
     "penalized = torch.where(x > 0, x / rep, x * rep)", "penalized = x / rep"),
    ("min_tokens forgets EOS",
     "stop = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))",
     "stop = list(p.stop_token_ids)"),
    ("top-p keeps the token that reaches top_p exactly",
     "drop_sorted = (mass_before >= top_p[:, None]) & (top_p < 1.0)[:, None]",
     "drop_sorted = (mass_before > top_p[:, None]) & (top_p < 1.0)[:, None]"),
    ("min-p drops the token exactly at the threshold",
     "drop = (probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values) & (min_p > 0)[:, None]",
     "drop = (probs <= min_p[:, None] * probs.max(dim=-1, keepdim=True).values) & (min_p > 0)[:, None]"),
    ("top-k drops ties with the k-th",
     "mask = (logits < kth) & torch.tensor([k > 0 for k in top_k])[:, None]",
     "mask = (logits <= kth) & torch.tensor([k > 0 for k in top_k])[:, None]"),
    ("presence penalty counts the prompt",
     "x = x - pres * seen_out.float()", "x = x - pres * (seen_out | seen_prompt).float()"),
]


@pytest.mark.parametrize("name,old,new", EDGE_BUGS, ids=[b[0] for b in EDGE_BUGS])
def test_edge_bug_is_caught(name, old, new, monkeypatch):
    plant(monkeypatch, "fast.worker.sampler", old, new)

    @given(batch=sampler_batches())
    @settings(max_examples=500, database=None, derandomize=True, phases=[Phase.generate])
    def prop(batch):
        logits, rows = batch
        check_sampler(fast_sample, logits, rows, EOS)

    with pytest.raises(AssertionError, match="sampler row"):
        prop()
