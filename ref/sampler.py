"""The reference sampler: one request's next token from one row of logits, obviously right.

Order (SPEC.md, "Sampling"): min_tokens mask -> repetition, frequency, presence penalties ->
greedy argmax, or: temperature -> top-k -> top-p -> min-p -> one draw of exponential noise from
the request's own generator, token = argmax(probs / noise). Logprobs are the raw model
logprobs (log_softmax of the unprocessed logits), as vLLM's default.
"""

from __future__ import annotations

from typing import Callable

import torch

from ref.outputs import Logprob
from ref.sampling_params import SamplingParams


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
                   output_ids: list[int], eos_token_ids: tuple[int, ...]) -> torch.Tensor:
    """Logits after the min_tokens mask and the penalties (what greedy takes the argmax of)."""
    logits = logits.float().clone()
    if len(output_ids) < params.min_tokens:
        logits[min_tokens_stop_ids(params, eos_token_ids)] = float("-inf")
    return apply_penalties(logits, params, prompt_ids, output_ids)


def decision_scores(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int], eos_token_ids: tuple[int, ...],
                    generator: torch.Generator | None) -> torch.Tensor:
    """Scores whose argmax is the next token: processed logits (greedy) or probs / noise."""
    processed = process_logits(logits, params, prompt_ids, output_ids, eos_token_ids)
    if params.greedy:
        return processed
    probs = torch.softmax(truncate(processed, params), dim=-1)
    return probs / exponential_noise(generator, probs.shape[-1])


def sample(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
           output_ids: list[int], eos_token_ids: tuple[int, ...],
           generator: torch.Generator | None) -> int:
    """The next token (argmax takes the lowest id among exact ties)."""
    return int(torch.argmax(decision_scores(logits, params, prompt_ids, output_ids,
                                            eos_token_ids, generator)))


def logprob_entry(logprobs: torch.Tensor, token_id: int, k: int,
                  decode: Callable[[int], str | None]) -> dict[int, Logprob]:
    """{token: Logprob} for the top-k of a logprob row [V] plus `token_id`."""
    ranks = lambda t: 1 + int((logprobs > logprobs[t]).sum())  # noqa: E731
    order = torch.sort(logprobs, descending=True, stable=True).indices[:k].tolist()
    # The sampled (or actual prompt) token first, then the top-k (as vLLM orders them).
    return {t: Logprob(float(logprobs[t]), ranks(t), decode(t)) for t in [token_id, *order]}
