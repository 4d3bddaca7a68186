"""Sampling at the edges: the engine's sampler against the oracle's, on logits built to sit on
SPEC §6's boundaries.

End-to-end workloads rarely reach these: a random model seldom makes EOS likely (so a
`min_tokens` mask that forgets EOS goes unseen), seldom has a *seen* token with a negative
logit near the top (so a repetition penalty that divides negative logits goes unseen), and
never puts a top-p or min-p cut exactly on a boundary. Here the logits are drawn on purpose:

- exact ties (integers), all-negative rows, EOS or a stop token as the maximum;
- probabilities that are powers of two, so cumulative sums land exactly on `top_p`, and a
  token whose probability is exactly `min_p` times the largest;
- `top_k` at 1, at the vocabulary size and beyond; temperatures at and just above the
  greedy threshold; penalties at their extremes over prompts and outputs that repeat tokens;
- the token controls of SPEC §6 step 1: a grammar's allowed set (sometimes only EOS, sometimes
  empty: the grammar has ended), allowed_token_ids, bad words whose prefix the output ends with,
  logit_bias at ±100, and their combinations that leave no token at all (§5 rule 0).

The engine exposes `sample(logits [S, V], rows, eos_token_ids) -> list[int]` (the adapter hook
`sample`),
where each row is `SamplerRow(params, prompt_ids, output_ids, seed, allowed_by_grammar,
bad_words_ids)` and a seeded row draws its `Exp(1)` noise from
`torch.Generator().manual_seed(seed)`. Every token must equal the oracle's `ref.sampler.sample`
on the same row, unless the oracle's own decision scores put the two tokens within the near-tie
margin (conformance/compare.py); a row the masks leave without a token must be -1 (NO_TOKEN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import note, strategies as st

from conformance.compare import near_tie_margin
from ref.sampling_params import SAMPLING_EPS, SamplingParams

VOCAB = 32
EOS = (2,)
NO_TOKEN = -1  # the hook's token for a row with nothing left to sample (SPEC §5 rule 0)


@dataclass(frozen=True)
class SamplerRow:
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    seed: int | None  # None for greedy rows
    allowed_by_grammar: list[int] | None = None  # the structured-output grammar's next tokens
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # params.bad_words as token sequences


@st.composite
def logits_rows(draw, vocab: int = VOCAB, eos: tuple[int, ...] = EOS) -> torch.Tensor:
    kind = draw(st.sampled_from(["normal", "ties", "negative", "equal_mass", "stop_on_top", "min_p_edge"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "ties":  # few distinct values: exact ties everywhere
        return torch.randint(-3, 4, (vocab,), generator=gen).float()
    if kind == "negative":
        return -torch.rand(vocab, generator=gen) * 6 - 0.1
    if kind == "equal_mass":  # m equal logits, the rest ~ -inf: probabilities exactly 1/m at any
        # temperature, so cumulative sums land exactly on top_p = 0.5 or 0.75
        logits = torch.full((vocab,), -1e4)
        logits[torch.randperm(vocab, generator=gen)[: draw(st.sampled_from([2, 4, 8]))]] = draw(st.sampled_from([-1.0, 0.0, 3.0]))
        return logits
    logits = torch.randn(vocab, generator=gen) * draw(st.sampled_from([0.5, 2.0, 5.0]))
    if kind == "stop_on_top":  # EOS (or a token that will be a stop token) is the clear favourite
        logits[draw(st.sampled_from(list(eos) + [5]))] = float(logits.max()) + 3.0
    if kind == "min_p_edge":  # one token's probability is exactly min_p = 1/4 of the largest
        top = int(logits.argmax())
        other = (top + 1) % vocab
        logits[other] = logits[top] - math.log(4)
    return logits


@st.composite
def sampler_params(draw, vocab: int = VOCAB) -> SamplingParams:
    kw = dict(
        max_tokens=16,
        repetition_penalty=draw(st.sampled_from([1.0, 1.0, 0.5, 1.3, 2.0])),
        presence_penalty=draw(st.sampled_from([0.0, 0.0, -2.0, 1.5, 2.0])),
        frequency_penalty=draw(st.sampled_from([0.0, 0.0, -1.0, 0.7, 2.0])),
        min_tokens=draw(st.sampled_from([0, 0, 3, 16])),
        ignore_eos=draw(st.booleans()),
        stop_token_ids=draw(st.sampled_from([[], [], [5], [5, 7]])),
    )
    if draw(st.booleans()):  # half the rows without penalties: exact ties stay exact only there
        kw.update(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)

    temperature = draw(st.sampled_from([0.0, SAMPLING_EPS / 2, SAMPLING_EPS, 1e-3, 0.7, 1.0, 1.8]))
    if temperature < SAMPLING_EPS:
        return SamplingParams(temperature=temperature, **kw)
    return SamplingParams(
        temperature=temperature,
        top_k=draw(st.sampled_from([0, -1, 1, 2, 5, vocab, vocab + 10])),
        top_p=draw(st.sampled_from([1.0, 0.5, 0.75, 0.9, 1e-3])),
        min_p=draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])),
        **kw,
    )


@st.composite
def sampler_batches(draw, vocab: int = VOCAB, eos: tuple[int, ...] = EOS):
    """(logits [S, V], rows): a batch mixing greedy and seeded rows (some seeds repeated)."""
    size = draw(st.integers(1, 6))
    rows, logits = [], []
    token = st.integers(0, vocab - 1)
    for _ in range(size):
        params = draw(sampler_params(vocab))
        repeat = draw(st.lists(token, min_size=1, max_size=3))  # tokens that come back often
        prompt = draw(st.lists(st.one_of(token, st.sampled_from(repeat)), min_size=1, max_size=12))
        output = draw(st.lists(st.one_of(token, st.sampled_from(repeat)), max_size=8))
        seed = None if params.greedy else draw(st.sampled_from([0, 1, 2**31, draw(st.integers(0, 2**40))]))
        logits.append(draw(logits_rows(vocab, eos)))
        # The token controls are drawn last and for a minority of rows, so that the draws above
        # (and the edges they were built to reach) stay what they were.
        rows.append(SamplerRow(draw(token_controls(params, vocab)), prompt, output, seed,
                               draw(grammar_masks(vocab, eos)), draw(bad_words(output, vocab))))
    return torch.stack(logits), rows


@st.composite
def token_controls(draw, params: SamplingParams, vocab: int = VOCAB) -> SamplingParams:
    """`params` with allowed_token_ids and/or logit_bias now and then (sometimes only the stop
    tokens are allowed: min_tokens may then leave nothing)."""
    token = st.integers(0, vocab - 1)
    extra = {}
    if draw(st.integers(0, 7)) == 0:
        extra["allowed_token_ids"] = draw(st.one_of(st.lists(token, min_size=1, max_size=6), st.just([*EOS, 5])))
    if draw(st.integers(0, 7)) == 0:
        extra["logit_bias"] = draw(st.dictionaries(token, st.sampled_from([-100.0, -5.0, 0.5, 5.0, 100.0]),
                                                   min_size=1, max_size=3))
    return SamplingParams(**{**params.__dict__, **extra}) if extra else params


@st.composite
def grammar_masks(draw, vocab: int = VOCAB, eos: tuple[int, ...] = EOS) -> list[int] | None:
    """A grammar's allowed next tokens: None (unconstrained) most often; a few tokens; only EOS (a
    complete sentence); nothing (the grammar has ended)."""
    kind = draw(st.sampled_from(["none"] * 9 + ["some", "eos", "ended"]))
    if kind == "none":
        return None
    if kind == "eos":
        return list(eos)
    if kind == "ended":
        return []
    return sorted(set(draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=10))))


@st.composite
def bad_words(draw, output: list[int], vocab: int = VOCAB) -> tuple[tuple[int, ...], ...]:
    """Bad words as token sequences; some start with the output's last tokens, so that their last
    token is banned now, some do not (nothing banned), some are one token (always banned)."""
    if draw(st.integers(0, 5)):
        return ()
    token = st.integers(0, vocab - 1)
    words = []
    for _ in range(draw(st.integers(1, 3))):
        n = draw(st.integers(0, min(2, len(output))))
        prefix = output[len(output) - n:] if n and draw(st.booleans()) else draw(st.lists(token, max_size=2))
        words.append((*prefix, draw(token)))
    return tuple(words)


def oracle_tokens(logits: torch.Tensor, rows: list[SamplerRow], eos: tuple[int, ...]) -> list[torch.Tensor]:
    """The oracle's decision scores per row (argmax = its token; all -inf = no token), each with
    its own generator."""
    from ref.sampler import TokenControls, decision_scores

    scores = []
    for row, r in zip(logits, rows):
        gen = None if r.seed is None else torch.Generator().manual_seed(r.seed)
        controls = TokenControls(r.allowed_by_grammar, [list(w) for w in r.bad_words_ids])
        scores.append(decision_scores(row, r.params, r.prompt_ids, r.output_ids, eos, gen, controls))
    return scores


def check_sampler(sample, logits: torch.Tensor, rows: list[SamplerRow], eos: tuple[int, ...] = EOS) -> None:
    """The engine's batched tokens equal the oracle's row by row (near-ties aside)."""
    got = sample(logits.clone(), rows, eos)
    assert isinstance(got, list) and len(got) == len(rows), f"sampler returned {got!r} for {len(rows)} rows"
    for i, (scores, token, r) in enumerate(zip(oracle_tokens(logits, rows, eos), got, rows)):
        if not bool(torch.isfinite(scores).any()):  # SPEC §5 rule 0
            assert token == NO_TOKEN, (f"sampler row {i} ({r.params}, grammar={r.allowed_by_grammar}, "
                                       f"bad words={r.bad_words_ids}): the masks leave no token, got {token}")
            continue
        want = int(torch.argmax(scores))
        if token == want:
            continue
        note(f"row {i}: logits={logits[i].tolist()}")
        p = r.params
        no_penalty = p.repetition_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0
        if p.greedy and no_penalty and 0 <= token < scores.shape[0] and float(scores[token]) == float(scores[want]):
            # Both sides see the very same logits: an exact tie is no rounding, and SPEC §6 breaks
            # it by the lowest token id (no randomness in a greedy row).
            raise AssertionError(
                f"sampler row {i} ({p}): greedy row with an exact tie picked token {token}, SPEC §6 picks "
                f"the lowest tied id {want}")
        gap = _gap(scores, want, token, r.params)
        assert gap < near_tie_margin(torch.float32), (
            f"sampler row {i} ({r.params}, prompt={r.prompt_ids}, output={r.output_ids}, seed={r.seed}): "
            f"token {token}, oracle {want} (oracle scores {float(scores[want]):.6g} vs {float(scores[token]):.6g})")


def _gap(scores: torch.Tensor, want: int, token: int, params: SamplingParams) -> float:
    """How far the engine's token is from the oracle's best, in logit units."""
    a, b = float(scores[want]), float(scores[token])
    if params.greedy:
        return a - b if math.isfinite(b) else math.inf
    if b <= 0 or not math.isfinite(b):
        return math.inf  # the oracle gives the engine's token no probability at all
    return (math.log(a) - math.log(b)) * params.temperature


def fast_sample(logits: torch.Tensor, rows: list[SamplerRow], eos_token_ids: tuple[int, ...]) -> list[int]:
    """The `sample` hook for `fast`: its batched sampler, one generator per seeded row."""
    from fast.worker.sampler import Sampler, SamplingRow

    gens = [None if r.seed is None else torch.Generator().manual_seed(r.seed) for r in rows]
    sampling_rows = [SamplingRow(r.params, r.prompt_ids, r.output_ids, g, [list(w) for w in r.bad_words_ids])
                     for r, g in zip(rows, gens)]
    return Sampler(eos_token_ids)(logits, sampling_rows, _grammar_rows(rows, logits.shape[1])).token_ids


def _grammar_rows(rows: list[SamplerRow], vocab: int):
    """fast's packed bitmask for the rows that carry a grammar mask (xgrammar's layout)."""
    from fast.worker.sampler import GrammarRows

    constrained = [r.allowed_by_grammar for r in rows if r.allowed_by_grammar is not None]
    if not constrained:
        return None
    words = torch.zeros(len(constrained), (vocab + 31) // 32, dtype=torch.int64)
    for i, allowed in enumerate(constrained):
        for t in allowed:
            words[i, t // 32] |= 1 << (t % 32)
    words[words >= 2**31] -= 2**32  # int32 two's complement
    row_of, k = [], 0
    for r in rows:
        row_of.append(k if r.allowed_by_grammar is not None else -1)
        k += r.allowed_by_grammar is not None
    return GrammarRows(words.to(torch.int32), row_of)
