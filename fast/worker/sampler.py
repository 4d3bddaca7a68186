"""The batched sampler: one vectorised pass over all sequences that sample this step.

Same semantics and order as `ref/sampler.py` (SPEC.md "Sampling"): the grammar bitmask,
allowed_token_ids, bad_words, logit_bias, min_tokens mask, penalties, then greedy argmax or
temperature -> top-k -> top-p -> min-p -> argmax(probs / q) with q ~ Exp(1) drawn from each
sequence's own generator (so a seeded sequence's tokens do not depend on who else is in the
batch). A row the masks leave without a finite logit samples nothing: its token is -1 (SPEC §5
rule 0). Work that no row needs (masks, penalties, truncation, logprobs) is skipped for the
whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    bad_words_token_ids: list[list[int]] = field(default_factory=list)


@dataclass
class GrammarRows:
    """The step's packed grammar bitmask (int32 [rows, ceil(vocab / 32)], bit t of a row set =
    token t allowed) and, per sampling row, its bitmask row (-1: unconstrained)."""

    bitmask: torch.Tensor
    row_of: list[int]


NO_TOKEN = -1  # the token of a row whose masks left nothing (SPEC §5 rule 0)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]  # per row; None where not requested
    sampled_logprobs: list[float | None]


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...]):
        self.eos_token_ids = tuple(eos_token_ids)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow],
                 grammar: GrammarRows | None = None) -> SamplerOutput:
        """logits: fp32 [S, vocab], one row per entry of `rows`."""
        raw = logits
        logits = logits.clone()
        masked = grammar is not None or any(_has_mask(r.params) or r.bad_words_token_ids for r in rows)
        if masked:
            logits = self._apply_masks(logits, rows, grammar)
        logits = self._apply_min_tokens(logits, rows)
        logits = self._apply_penalties(logits, rows)
        dead_rows: set[int] = set()
        # Only masks (or a repetition penalty overflowing to -inf) can leave a row with nothing.
        if masked or any(r.params.min_tokens or _has_penalty(r.params) for r in rows):
            dead_rows = set(torch.nonzero(torch.isneginf(logits).all(dim=-1)).flatten().tolist())
        tokens = torch.argmax(logits, dim=-1)  # greedy rows keep this
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy and i not in dead_rows]
        if random_rows:  # a dead row draws nothing: softmax of all -inf is NaN, and it ends anyway
            idx = torch.tensor(random_rows)
            sampled = self._sample_random(logits[idx], [rows[i] for i in random_rows])
            tokens[idx] = sampled
        token_list = tokens.tolist()
        for i in dead_rows:
            token_list[i] = NO_TOKEN
        entries, sampled_lp = self._logprobs(raw, rows, token_list)
        return SamplerOutput(token_list, entries, sampled_lp)

    # ------------------------------------------------------------------ processing
    def _apply_masks(self, logits: torch.Tensor, rows: list[SamplingRow], grammar: GrammarRows | None) -> torch.Tensor:
        """SPEC §6 step 1 before min_tokens: grammar bitmask, allowed_token_ids, bad_words, logit_bias."""
        V = logits.shape[1]
        if grammar is not None:
            constrained = [i for i, b in enumerate(grammar.row_of) if b >= 0]
            if constrained:
                allowed = unpack_bitmask(grammar.bitmask[[grammar.row_of[i] for i in constrained]], V)
                logits[constrained] = logits[constrained].masked_fill(~allowed, NEG_INF)
        for i, r in enumerate(rows):
            p = r.params
            if p.allowed_token_ids is not None:
                keep = torch.zeros(V, dtype=torch.bool)
                keep[[t for t in p.allowed_token_ids if t < V]] = True
                logits[i].masked_fill_(~keep, NEG_INF)
            banned = _banned_by_bad_words(r.bad_words_token_ids, r.output_ids)
            if banned:
                logits[i, banned] = NEG_INF
            if p.logit_bias:
                ids = list(p.logit_bias)
                logits[i, ids] += torch.tensor([p.logit_bias[t] for t in ids])
        return logits

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
            # The k-th largest value is the same whichever way it is found: topk of the largest k
            # asked, not a sort of the whole row (~15x less work at k = 50 of 8192).
            kth = torch.topk(logits, max(top_k), dim=-1).values.gather(1, kth_index)
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
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None and tokens[i] != NO_TOKEN]
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


def _has_mask(p: SamplingParams) -> bool:
    return p.allowed_token_ids is not None or bool(p.logit_bias)


def _banned_by_bad_words(bad_words: list[list[int]], output_ids: list[int]) -> list[int]:
    """The last token of each bad word whose other tokens end the output (one-token words: always)."""
    banned = []
    for word in bad_words:
        prefix = word[:-1]
        if not prefix or (len(output_ids) >= len(prefix) and output_ids[len(output_ids) - len(prefix):] == prefix):
            banned.append(word[-1])
    return banned


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [rows, vocab_size] from xgrammar's packed layout: token t is bit t % 32 of word t // 32."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [rows, words, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()
