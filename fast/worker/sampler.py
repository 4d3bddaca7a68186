"""The batched sampler: one vectorised pass over all sequences that sample this step.

Same semantics and order as `ref/sampler.py` (SPEC.md "Sampling"): min_tokens mask,
penalties, greedy argmax or temperature -> top-k -> top-p -> min-p -> argmax(probs / q) with
q ~ Exp(1) drawn from each sequence's own generator (so a seeded sequence's tokens do not
depend on who else is in the batch). Work that no row needs (penalties, truncation, logprobs) is
skipped for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ref.outputs import Logprob
from ref.sampling_params import SamplingParams

NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    """What the sampler needs of one sequence."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None  # None for greedy rows


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]  # per row; None where not requested
    sampled_logprobs: list[float | None]


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...]):
        self.eos_token_ids = tuple(eos_token_ids)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """logits: fp32 [S, vocab], one row per entry of `rows`."""
        raw = logits
        logits = self._apply_min_tokens(logits.clone(), rows)
        logits = self._apply_penalties(logits, rows)
        tokens = torch.argmax(logits, dim=-1)  # greedy rows keep this
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if random_rows:
            idx = torch.tensor(random_rows)
            sampled = self._sample_random(logits[idx], [rows[i] for i in random_rows])
            tokens[idx] = sampled
        token_list = tokens.tolist()
        entries, sampled_lp = self._logprobs(raw, rows, token_list)
        return SamplerOutput(token_list, entries, sampled_lp)

    # ------------------------------------------------------------------ processing
    def _apply_min_tokens(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        for i, r in enumerate(rows):
            p = r.params
            if len(r.output_ids) < p.min_tokens:
                stop = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
                logits[i, stop] = NEG_INF
        return logits

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        pen = [i for i, r in enumerate(rows) if _has_penalty(r.params)]
        if not pen:
            return logits
        S, V = len(pen), logits.shape[1]
        out_counts = torch.zeros(S, V)
        seen_prompt = torch.zeros(S, V, dtype=torch.bool)
        for j, i in enumerate(pen):
            r = rows[i]
            if r.output_ids:
                out_counts[j].index_add_(0, torch.tensor(r.output_ids), torch.ones(len(r.output_ids)))
            seen_prompt[j, r.prompt_ids] = True
        seen_out = out_counts > 0
        rep = torch.tensor([rows[i].params.repetition_penalty for i in pen])[:, None]
        freq = torch.tensor([rows[i].params.frequency_penalty for i in pen])[:, None]
        pres = torch.tensor([rows[i].params.presence_penalty for i in pen])[:, None]
        x = logits[pen]
        penalized = torch.where(x > 0, x / rep, x * rep)
        x = torch.where(seen_out | seen_prompt, penalized, x)
        x = x - freq * out_counts
        x = x - pres * seen_out.float()
        logits[pen] = x
        return logits

    def _sample_random(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        params = [r.params for r in rows]
        logits = logits / torch.tensor([p.temperature for p in params])[:, None]
        V = logits.shape[1]
        top_k = [p.top_k if 0 < p.top_k < V else 0 for p in params]
        if any(top_k):
            kth_index = torch.tensor([max(k, 1) - 1 for k in top_k])[:, None]
            kth = torch.sort(logits, dim=-1, descending=True).values.gather(1, kth_index)
            mask = (logits < kth) & torch.tensor([k > 0 for k in top_k])[:, None]
            logits = logits.masked_fill(mask, NEG_INF)
        top_p = torch.tensor([p.top_p for p in params])
        if bool((top_p < 1.0).any()):
            probs = torch.softmax(logits, dim=-1)
            sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
            mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            drop_sorted = (mass_before >= top_p[:, None]) & (top_p < 1.0)[:, None]
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, NEG_INF)
        min_p = torch.tensor([p.min_p for p in params])
        if bool((min_p > 0).any()):
            probs = torch.softmax(logits, dim=-1)
            drop = (probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values) & (min_p > 0)[:, None]
            logits = logits.masked_fill(drop, NEG_INF)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs)
        for j, r in enumerate(rows):  # one draw per row from its own generator (batch invariance)
            noise[j].exponential_(generator=r.generator)
        return torch.argmax(probs / noise, dim=-1)

    # ------------------------------------------------------------------ logprobs
    def _logprobs(self, raw: torch.Tensor, rows: list[SamplingRow], tokens: list[int]):
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        entries: list = [None] * len(rows)
        sampled: list = [None] * len(rows)
        if not want:
            return entries, sampled
        lp = torch.log_softmax(raw[want], dim=-1)
        k_max = max(rows[i].params.logprobs for i in want)
        top = torch.sort(lp, dim=-1, descending=True, stable=True).indices[:, :k_max].tolist() if k_max else None
        for j, i in enumerate(want):
            entries[i] = logprob_entry(lp[j], tokens[i], top[j][: rows[i].params.logprobs] if top else [])
            sampled[i] = entries[i][tokens[i]].logprob
        return entries, sampled


def logprob_entry(row: torch.Tensor, token_id: int, top_ids: list[int]) -> dict[int, Logprob]:
    """{token: Logprob}: `token_id` first, then `top_ids`; rank = 1 + #strictly greater. The text
    is left None: workers hold no tokenizer (the scheduler adds it)."""
    ids = [token_id, *top_ids]
    values = row[ids]
    ranks = (row[None, :] > values[:, None]).sum(dim=-1) + 1
    return {t: Logprob(float(v), int(rk)) for t, v, rk in zip(ids, values.tolist(), ranks.tolist())}


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
