"""Scheduling state of one sample (`Request`) and of a user request with n samples (`RequestGroup`).

The per-sample output state and stop rules are the contract's (`ref.sequence.Sequence`, SPEC.md
"Request lifecycle"); what `fast` adds is where the sample stands in the paged cache:

    token_ids:  | prompt ...................... | outputs ....... |
                |<---- num_computed_tokens ---->|<- to compute ->|
    a step schedules a chunk of the "to compute" part; when the chunk reaches the end of
    token_ids, the step samples the next token.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from ref.outputs import PromptLogprobs, RequestOutput
from ref.sampling_params import SamplingParams
from ref.sequence import Sequence


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
    """One sample: the unit the scheduler and the KV cache manager see."""

    request_id: SampleId  # the KV cache manager's key for this sample (tests may use any hashable)
    group: "RequestGroup"
    seq: Sequence
    token_ids: list[int]  # prompt + generated tokens
    arrival: int  # engine-wide admission counter: FCFS order and preemption tie-break
    priority: int = 0  # lower value = served first (as vLLM)
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.group.prompt_token_ids)

    @property
    def params(self) -> SamplingParams:
        return self.seq.params

    @property
    def finished(self) -> bool:
        return self.seq.finished

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.seq.append(token_id, self.num_prompt_tokens, self.group.stop_ctx)


@dataclass(eq=False)
class RequestGroup:
    """A user request: its n samples, prompt logprobs and timing."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_ctx: object
    samples: list[Request] = field(default_factory=list)
    # Samples 1..n-1 wait here until sample 0's prompt is computed, then fork from it.
    pending_forks: list[Request] = field(default_factory=list)
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
            outputs=[s.seq.to_output() for s in self.samples],
            finished=self.finished,
        )
