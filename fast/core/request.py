"""Scheduling state of one sample (`Request`) and of a user request with n samples (`RequestGroup`).

The per-sample state is `fast`'s own, stop rules included: `fast.core.detokenizer.StopChecker`
applies SPEC.md's "Request lifecycle" rules incrementally (the oracle, `ref.sequence.check_stop`,
re-decodes the whole output per token). Where a sample stands in the paged cache:

    token_ids:  | prompt ...................... | outputs ....... |
                |<---- num_computed_tokens ---->|<- to compute ->|
    a step schedules a chunk of the "to compute" part; when the chunk reaches the end of
    token_ids, the step samples the next token.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from fast.core.detokenizer import StopChecker
from fast.core.kv_cache_manager import PrefixHit
from ref.outputs import CompletionOutput, PromptLogprobs, RequestOutput
from ref.sampling_params import SamplingParams
from ref.sequence import StopContext

logger = logging.getLogger(__name__)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class SampleId(NamedTuple):
    """The internal id of one sample: (the user's request id, sample index).

    A tuple, never a string, so that no user id (always a string) can equal a sample's id:
    a user request named like another request's sample cannot take over its KV blocks.
    """

    request_id: str
    index: int

    def __str__(self) -> str:
        return f"{self.request_id}#{self.index}"


@dataclass(eq=False)
class Request:
    """One sample: the unit the scheduler and the KV cache manager see, with its output state.

    `token_ids` is prompt + outputs; `text` and the stop rules are kept by a `StopChecker`."""

    request_id: SampleId  # the KV cache manager's key for this sample (tests may use any hashable)
    group: "RequestGroup"
    index: int  # sample index within the group
    params: SamplingParams  # this sample's params (its own seed when n > 1)
    seed: int | None  # generator seed, held by the worker; None for greedy
    token_ids: list[int]  # prompt + generated tokens
    arrival: int  # engine-wide admission counter: FCFS order and preemption tie-break
    priority: int = 0  # lower value = served first (as vLLM)
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    num_preemptions: int = 0
    logprobs: list | None = None  # per output token, when params.logprobs is set
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # What the workers hold of this sample: nothing until it is first scheduled; then the first
    # `num_synced_tokens` tokens and `num_synced_blocks` blocks of its table (0 after a preemption).
    known_to_workers: bool = False
    num_synced_tokens: int = 0
    num_synced_blocks: int = 0
    prefix_hit: PrefixHit | None = None  # its last prefix-cache lookup while waiting
    # Structured output: this sample's grammar matcher (xgrammar), at the state of its output tokens.
    grammar: Any = None

    _stops: StopChecker = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs, self.cumulative_logprob = [], 0.0
        self._stops = StopChecker(self.params, self.num_prompt_tokens, self.group.stop_ctx)

    @property
    def text(self) -> str:
        """decode(output ids) as SPEC §5 defines it (trimmed once finished by a stop)."""
        return self._stops.text

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.group.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append_token(self, token_id: int) -> None:
        """Add a sampled token, advance the grammar, refresh the text and apply the stop rules."""
        if self.grammar is not None and not self.grammar.accept_token(token_id):
            # The step's mask allowed it, so the grammar must: a broken invariant, not the user's
            # fault. The sample ends visibly instead of taking the engine down.
            logger.error("sample %s: the grammar rejected token %d that its mask allowed", self.request_id, token_id)
            self.finish("abort")
            return
        self.token_ids.append(token_id)
        reason, stop_reason = self._stops.append(token_id)
        if reason is not None:
            self.finish(reason, stop_reason)

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason

    def to_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.text,
            token_ids=self.output_token_ids,
            cumulative_logprob=self.cumulative_logprob,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass(eq=False)
class RequestGroup:
    """A user request: its n samples, prompt logprobs and timing."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_ctx: StopContext
    samples: list[Request] = field(default_factory=list)
    # Samples 1..n-1 wait here until sample 0's prompt is computed, then fork from it.
    pending_forks: list[Request] = field(default_factory=list)
    bad_words_token_ids: list[list[int]] = field(default_factory=list)  # params.bad_words, tokenized once
    prompt_logprobs: PromptLogprobs | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.samples)

    def to_output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            prompt_logprobs=self.prompt_logprobs,
            outputs=[s.to_output() for s in self.samples],
            finished=self.finished,
        )
