"""The plain data that crosses the boundary between the engine process and the workers.

    Scheduler.schedule() ──SchedulerOutput──> Executor.execute_model() ──> Worker(s)
    Scheduler.update_from_output() <──ModelRunnerOutput── (rank 0 only)

Both are made of ints, lists, dicts, `SamplingParams`, `Logprob` and (the grammar bitmask) a numpy
array: they pickle, so the same
objects go to an in-process worker, to worker processes through a pipe, or to Ray actors. No live
`Request` crosses: a worker keeps its own per-request state (token ids, block table, generator)
and learns every change from the next `SchedulerOutput`, so data flows one way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fast.core.kv_cache_manager import BlockCopy
from fast.core.request import SampleId
from ref.outputs import Logprob
from ref.sampling_params import SamplingParams

LogprobsEntry = dict[int, Logprob]  # token id -> Logprob, decoded_token left None by workers


@dataclass
class NewRequestData:
    """A sample the workers have not seen yet (or forget after it finished).

    `token_ids` is the whole sequence so far (the prompt, and any outputs); `num_prompt_tokens`
    splits the two.
    `fork_of`: the sample this one was forked from in this very step; it samples from the
    parent's last row (the parent's prompt KV is shared, its partial last block copied)."""

    req_id: SampleId
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    seed: int | None  # the sample's generator seed; None for greedy
    block_ids: list[int]
    num_computed_tokens: int
    prompt_logprobs: int | None = None  # top-k prompt logprobs to return (sample 0 of a group only)
    fork_of: SampleId | None = None
    bad_words_token_ids: list[list[int]] = field(default_factory=list)  # params.bad_words, tokenized


@dataclass
class CachedRequestData:
    """A sample the workers know: what changed since the last step it was in.

    `new_token_ids`: tokens appended by the scheduler since (the tokens sampled in earlier steps).
    `resumed`: it was preempted; `block_ids` then replaces the whole table, else it is appended."""

    req_id: SampleId
    new_token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    resumed: bool = False


@dataclass
class SchedulerOutput:
    """One step's plan. `num_scheduled_tokens` is in batch order (running first, then admitted):
    the model runner lays the tokens out in that order."""

    num_scheduled_tokens: dict[SampleId, int] = field(default_factory=dict)
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: list[CachedRequestData] = field(default_factory=list)
    forked_reqs: list[NewRequestData] = field(default_factory=list)  # sample this step, not computed
    block_copies: list[BlockCopy] = field(default_factory=list)  # applied after the forward pass
    preempted_req_ids: list[SampleId] = field(default_factory=list)
    # preempted_for[i]: the running sample that needed a KV block when preempted_req_ids[i] was
    # chosen to free one (the same sample when the policy picked it itself). For traces and logs.
    preempted_for: list[SampleId] = field(default_factory=list)
    finished_req_ids: list[SampleId] = field(default_factory=list)  # workers drop their state
    # Structured output: the constrained samples that sample this step, and row i of the packed
    # bitmask (int32 [rows, ceil(vocab / 32)]; bit t set = token t allowed) is the i-th one's.
    # A numpy array, not a tensor: torch pickles tensors for worker processes through shared
    # memory handles that only one receiver can open, and every rank receives this object.
    structured_req_ids: list[SampleId] = field(default_factory=list)
    grammar_bitmask: np.ndarray | None = None

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


@dataclass
class ModelRunnerOutput:
    """What one step produced, for the samples that sampled (in the runner's row order).
    A sampled token of -1: SPEC §5 rule 0, the masks left no token (the sample ends, no token).

    `prompt_logprobs[req_id]`: entries for the prompt positions scored this step, in order
    (a chunked prompt gets its entries over several steps)."""

    req_ids: list[SampleId] = field(default_factory=list)
    sampled_token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobsEntry | None] = field(default_factory=list)
    prompt_logprobs: dict[SampleId, list[LogprobsEntry]] = field(default_factory=dict)
