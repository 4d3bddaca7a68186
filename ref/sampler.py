"""The reference sampler: one request's next token from one row of logits, obviously right.

Order (SPEC.md, "Sampling"): masks and bias (structured output, allowed_token_ids, bad_words,
logit_bias, then the min_tokens mask) -> repetition, frequency, presence penalties -> greedy
argmax, or: temperature -> top-k -> top-p -> min-p -> one draw of exponential noise from the
request's own generator, token = argmax(probs / noise). When the masks leave no token, there is
no next token (`sample` returns None: SPEC §5 rule 0) and nothing is drawn. Logprobs are the raw
model logprobs (log_softmax of the unprocessed logits), as vLLM's default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ref.outputs import Logprob
from ref.sampling_params import SamplingParams


@dataclass(frozen=True)
class TokenControls:
    """What SPEC §6 step 1 needs of a sample besides its SamplingParams.

    allowed_by_grammar: the tokens its structured-output grammar accepts next (None: no constraint)
    bad_words_ids: the token sequences of its bad_words (`ref.inputs.bad_words_token_ids`)
    """

    allowed_by_grammar: list[int] | None = None
    bad_words_ids: list[list[int]] = field(default_factory=list)


NO_CONTROLS = TokenControls()


def keep_only(logits: torch.Tensor, allowed: list[int]) -> torch.Tensor:
    """Every token not in `allowed` gets -inf."""
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
    keep[torch.tensor(allowed, dtype=torch.long)] = True
    return logits.masked_fill(~keep, float("-inf"))


def bad_word_last_tokens(bad_words_ids: list[list[int]], output_ids: list[int]) -> list[int]:
    """The last token of every bad word whose other tokens the output ends with (a one-token
    word always): generating it would complete the word."""
    banned = []
    for word in bad_words_ids:
        prefix = word[:-1]
        if not prefix or (len(output_ids) >= len(prefix) and output_ids[-len(prefix):] == prefix):
            banned.append(word[-1])
    return banned


def apply_token_controls(logits: torch.Tensor, params: SamplingParams, output_ids: list[int],
                         eos_token_ids: tuple[int, ...], controls: TokenControls) -> torch.Tensor:
    """SPEC §6 step 1, in its order: structured-output mask, allowed_token_ids, bad_words,
    logit_bias (added), then the min_tokens mask. Returns a new tensor."""
    logits = logits.clone()
    if controls.allowed_by_grammar is not None:
        logits = keep_only(logits, controls.allowed_by_grammar)
    if params.allowed_token_ids is not None:
        logits = keep_only(logits, params.allowed_token_ids)
    banned = bad_word_last_tokens(controls.bad_words_ids, output_ids)
    if banned:
        logits[banned] = float("-inf")
    for token, bias in (params.logit_bias or {}).items():
        logits[token] += bias
    if len(output_ids) < params.min_tokens:
        logits[min_tokens_stop_ids(params, eos_token_ids)] = float("-inf")
    return logits


def min_tokens_stop_ids(params: SamplingParams, eos_token_ids: tuple[int, ...]) -> list[int]:
    """Tokens masked while fewer than min_tokens were generated: stop ids, and EOS unless ignored."""
    ids = list(params.stop_token_ids)
    if not params.ignore_eos:
        ids += list(eos_token_ids)
    return ids


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int]) -> torch.Tensor:
    """Repetition over prompt+output tokens; frequency and presence over output tokens only."""
    vocab = logits.shape[-1]
    out_counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=vocab)[:vocab].float()
    seen = out_counts > 0
    if prompt_ids:
        seen_any = seen | (torch.bincount(torch.tensor(prompt_ids), minlength=vocab)[:vocab] > 0)
    else:
        seen_any = seen
    rep = params.repetition_penalty
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen_any, penalized, logits)
    logits = logits - params.frequency_penalty * out_counts
    return logits - params.presence_penalty * seen.float()


def truncate(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits with top-k, top-p, then min-p applied (masked to -inf)."""
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.sort(logits, descending=True).values[params.top_k - 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th stay
    if params.top_p < 1.0:
        probs = torch.softmax(logits, dim=-1)
        sorted_probs, order = torch.sort(probs, descending=True, stable=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # exclusive prefix sum
        drop_sorted = mass_before >= params.top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def exponential_noise(generator: torch.Generator, vocab: int) -> torch.Tensor:
    """The single draw a random-sampling step takes from its request's generator."""
    return torch.empty(vocab, dtype=torch.float32).exponential_(generator=generator)


def process_logits(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                   output_ids: list[int], eos_token_ids: tuple[int, ...],
                   controls: TokenControls = NO_CONTROLS) -> torch.Tensor:
    """Logits after the masks and bias, then the penalties (what greedy takes the argmax of).
    The penalties keep -inf at -inf and finite scores finite, so "any token left?" can be asked
    of the result."""
    logits = apply_token_controls(logits.float(), params, output_ids, eos_token_ids, controls)
    return apply_penalties(logits, params, prompt_ids, output_ids)


def any_token_left(processed: torch.Tensor) -> bool:
    """False when the masks left no token with a finite score (SPEC §5 rule 0)."""
    return bool(torch.isfinite(processed).any())


def decision_scores(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int], eos_token_ids: tuple[int, ...],
                    generator: torch.Generator | None,
                    controls: TokenControls = NO_CONTROLS) -> torch.Tensor:
    """Scores whose argmax is the next token: processed logits (greedy) or probs / noise.

    When no token is left (rule 0) they are the all -inf processed logits and nothing is drawn
    from the generator: the sample ends there, so there is no later draw to keep in step."""
    processed = process_logits(logits, params, prompt_ids, output_ids, eos_token_ids, controls)
    if params.greedy or not any_token_left(processed):
        return processed
    probs = torch.softmax(truncate(processed, params), dim=-1)
    return probs / exponential_noise(generator, probs.shape[-1])


def sample(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
           output_ids: list[int], eos_token_ids: tuple[int, ...],
           generator: torch.Generator | None, controls: TokenControls = NO_CONTROLS) -> int | None:
    """The next token (argmax takes the lowest id among exact ties), or None when the masks
    leave no token (SPEC §5 rule 0: the sample ends with no token)."""
    scores = decision_scores(logits, params, prompt_ids, output_ids, eos_token_ids, generator, controls)
    if not any_token_left(scores):
        return None
    return int(torch.argmax(scores))


def logprob_entry(logprobs: torch.Tensor, token_id: int, k: int,
                  decode: Callable[[int], str | None]) -> dict[int, Logprob]:
    """{token: Logprob} for the top-k of a logprob row [V] plus `token_id`."""
    ranks = lambda t: 1 + int((logprobs > logprobs[t]).sum())  # noqa: E731
    order = torch.sort(logprobs, descending=True, stable=True).indices[:k].tolist()
    # The sampled (or actual prompt) token first, then the top-k (as vLLM orders them).
    return {t: Logprob(float(logprobs[t]), ranks(t), decode(t)) for t in [token_id, *order]}
