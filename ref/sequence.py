"""One sample's generation state and the stop rules applied after each new token.

Stop rules, checked in this order after a token is appended (SPEC.md, "Request lifecycle"):
1. once `min_tokens` are generated: a stop token (EOS unless ignore_eos, or any of
   stop_token_ids) -> "stop"; the token stays in token_ids but not in text (unless
   include_stop_str_in_output);
2. once `min_tokens` are generated: a stop string anywhere in the decoded text -> "stop"; the
   text is cut before it (after it with include_stop_str_in_output); the earliest occurrence
   wins, ties go to the string listed first;
3. max_tokens generated, or prompt + output reaching max_model_len -> "length".
And before a token (rule 0): when the sampler's masks leave no token, the sample finishes with
"stop", no stop_reason and no token (`Sequence.finish_without_token`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ref.outputs import CompletionOutput
from ref.sampling_params import SamplingParams
from ref.structured import TokenGrammar
from ref.tokenizer import TextCodec


@dataclass
class StopContext:
    """What the stop rules need besides the sequence itself."""

    eos_token_ids: tuple[int, ...]
    max_model_len: int
    codec: TextCodec


@dataclass
class Sequence:
    index: int
    params: SamplingParams  # this sample's params (its own seed when n > 1)
    generator: torch.Generator | None  # None for greedy
    output_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    cumulative_logprob: float | None = None
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    grammar: TokenGrammar | None = None  # its own structured-output state: exactly output_ids taken

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def allowed_by_grammar(self) -> list[int] | None:
        """The tokens its constraint takes next (None: unconstrained)."""
        return None if self.grammar is None else self.grammar.allowed_tokens()

    def append(self, token_id: int, prompt_len: int, ctx: StopContext) -> None:
        """Add a sampled token, refresh the text and apply the stop rules.

        The grammar takes every appended token, the last one too (even when a stop rule ends the
        sample on it), so its state is always exactly the output's tokens."""
        self.output_ids.append(token_id)
        if self.grammar is not None:
            self.grammar.accept(token_id)
        self.text, finish_reason, stop_reason = check_stop(self.output_ids, self.params, prompt_len, ctx)
        if finish_reason is not None:
            self.finish(finish_reason, stop_reason)

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason

    def finish_without_token(self) -> None:
        """Rule 0: the masks left no token, so the sample ends here ("stop", no stop_reason)."""
        self.finish("stop")

    def to_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.text,
            token_ids=list(self.output_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


def check_stop(output_ids: list[int], params: SamplingParams, prompt_len: int,
               ctx: StopContext) -> tuple[str, str | None, int | str | None]:
    """(text, finish_reason, stop_reason) after the last of `output_ids` was appended: the rules
    of this module's docstring, in order. Shared by both engines (each keeps its own state)."""
    p = params
    decode = lambda ids: ctx.codec.decode(ids, p.skip_special_tokens)  # noqa: E731
    token_id = output_ids[-1]
    text = decode(output_ids)
    if len(output_ids) >= p.min_tokens:
        stop_tokens = set(p.stop_token_ids) | (set() if p.ignore_eos else set(ctx.eos_token_ids))
        if token_id in stop_tokens:
            if not p.include_stop_str_in_output:
                text = decode(output_ids[:-1])
            return text, "stop", token_id if token_id in p.stop_token_ids else None
        hit = find_stop_string(text, p.stop)
        if hit is not None:
            pos, stop_str = hit
            text = text[: pos + len(stop_str)] if p.include_stop_str_in_output else text[:pos]
            return text, "stop", stop_str
    max_tokens = p.max_tokens if p.max_tokens is not None else ctx.max_model_len
    if len(output_ids) >= max_tokens or prompt_len + len(output_ids) >= ctx.max_model_len:
        return text, "length", None
    return text, None, None


def find_stop_string(text: str, stops: list[str]) -> tuple[int, str] | None:
    """(position, string) of the earliest stop-string occurrence in text; ties: listed first."""
    best = None
    for s in stops:
        pos = text.find(s)
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, s)
    return best


def draw_base_seed(engine_generator: torch.Generator) -> int:
    """The per-request seed an engine draws at add_request (used by unseeded samples)."""
    from ref.sampling_params import MAX_SEED

    return int(torch.randint(0, MAX_SEED, (1,), generator=engine_generator))


def sample_seed(params: SamplingParams, base_seed: int, index: int) -> int | None:
    """The generator seed of sample `index` (its own params): the request's seed, else the
    engine-drawn base + index; None for greedy samples (they draw nothing)."""
    from ref.sampling_params import MAX_SEED

    if params.greedy:
        return None
    return params.seed if params.seed is not None else (base_seed + index) % (MAX_SEED + 1)


def make_sequences(params: SamplingParams, base_seed: int,
                   new_grammar: Callable[[], TokenGrammar] | None = None) -> list[Sequence]:
    """The n samples of a request: sample i seeds its generator with seed + i (or base + i);
    with a constraint, each gets its own grammar state from `new_grammar()`."""
    seqs = []
    for i in range(params.n):
        p = params.for_sample(i)
        seed = sample_seed(p, base_seed, i)
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        want_lp = p.logprobs is not None
        seqs.append(Sequence(index=i, params=p, generator=gen, logprobs=[] if want_lp else None,
                             cumulative_logprob=0.0 if want_lp else None,
                             grammar=None if new_grammar is None else new_grammar()))
    return seqs
