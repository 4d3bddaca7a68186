"""Model runner: keeps the worker's copy of every live sample and turns one `SchedulerOutput`
into one forward pass, sampled tokens and logprobs.

Per step, for the scheduled samples in batch order (no padding):

    input_ids, positions, slot_mapping : [num_tokens]   (chunk of sample 0 | chunk of sample 1 | ...)
    AttentionMetadata                  : cu_seqlens_q, seq_lens, block_tables
    sample rows                        : the last row of each sample whose chunk reaches the end of
                                         its tokens (it samples this step), followed by the samples
                                         forked from it in this step (they share that row)

slot_mapping comes from the block table: position p -> block_ids[p // block_size] * block_size +
p % block_size. Every rank runs the same steps (the collectives inside the model need it); only the
driver (rank 0) samples and returns a `ModelRunnerOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fast.attention import AttentionBackend, AttentionMetadata
from fast.core.kv_cache_manager import BlockCopy
from fast.core.outputs import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput
from fast.core.request import SampleId
from fast.worker.model import PagedDecoder
from fast.worker.sampler import GrammarRows, Sampler, SamplingRow, logprob_entry
from ref.sampling_params import SamplingParams


@dataclass(eq=False)
class CachedRequestState:
    """The worker's copy of one sample, kept from its first step until it finishes (a preempted
    sample keeps its generator and its scored prompt positions)."""

    req_id: SampleId
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # kept apart from the prompt: the sampler reads both without a copy
    params: SamplingParams
    generator: torch.Generator | None
    block_ids: list[int]
    num_computed_tokens: int
    prompt_logprobs: int | None
    num_prompt_logprobs: int = 0  # prompt positions scored so far (position p scores token p + 1)
    bad_words_token_ids: list[list[int]] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids [start, end) of prompt + output (a decode step reads one: O(end - start))."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n: end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    def token_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # int64 [N]
    positions: torch.Tensor  # int64 [N]
    slot_mapping: torch.Tensor  # int64 [N]
    metadata: AttentionMetadata
    sample_rows: list[int]  # hidden row each sampling sample reads
    samplers: list[CachedRequestState]  # the samples that sample, in sample_rows order
    chunks: list[tuple[CachedRequestState, int, int, int]]  # (state, first row, start position, length)


class ModelRunner:
    def __init__(self, model: PagedDecoder, num_blocks: int, block_size: int, backend: AttentionBackend,
                 device: torch.device | str = "cpu", eos_token_ids: tuple[int, ...] = (),
                 is_driver: bool = True):
        self.model = model
        self.block_size = block_size
        self.backend = backend
        self.device = torch.device(device)
        self.is_driver = is_driver
        self.sampler = Sampler(eos_token_ids)
        self.requests: dict[SampleId, CachedRequestState] = {}
        shape = model.kv_cache_shape(num_blocks, block_size)  # this rank's KV heads
        # Zeros, not empty: backends may read (and mask) slots no sequence has written yet.
        self.kv_caches = [
            (torch.zeros(shape, dtype=model.dtype, device=self.device),
             torch.zeros(shape, dtype=model.dtype, device=self.device))
            for _ in range(model.config.num_hidden_layers)
        ]

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        self.update_states(scheduler_output)
        if scheduler_output.is_empty:
            return ModelRunnerOutput() if self.is_driver else None
        inputs = self.prepare(scheduler_output)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.slot_mapping,
                            inputs.metadata, self.backend)
        self.copy_blocks(scheduler_output.block_copies)  # the parents' KV is written now
        prompt_logprobs = self._prompt_logprobs(inputs, hidden)
        logits = self.model.compute_logits(hidden[inputs.sample_rows]) if inputs.sample_rows else None
        if not self.is_driver:
            return None
        output = ModelRunnerOutput(prompt_logprobs=prompt_logprobs)
        if logits is not None:
            rows = [SamplingRow(st.params, st.prompt_token_ids, st.output_token_ids, st.generator,
                                st.bad_words_token_ids) for st in inputs.samplers]
            result = self.sampler(logits.cpu(), rows, self._grammar_rows(scheduler_output, inputs))
            output.req_ids = [st.req_id for st in inputs.samplers]
            output.sampled_token_ids = result.token_ids
            output.logprobs = result.logprobs
        return output

    @staticmethod
    def _grammar_rows(out: SchedulerOutput, inputs: StepInputs) -> GrammarRows | None:
        """The step's bitmask with, per sampling row, the bitmask row that constrains it (-1: none)."""
        if out.grammar_bitmask is None:
            return None
        row_of = {req_id: i for i, req_id in enumerate(out.structured_req_ids)}
        return GrammarRows(torch.from_numpy(out.grammar_bitmask), [row_of.get(st.req_id, -1) for st in inputs.samplers])

    def update_states(self, out: SchedulerOutput) -> None:
        """Apply what the scheduler changed since the last step (one way: scheduler -> worker)."""
        for req_id in out.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in out.scheduled_new_reqs:
            self.requests[new.req_id] = self._new_state(new)
        for cached in out.scheduled_cached_reqs:
            self._update_state(cached)
        for child in out.forked_reqs:
            self.requests[child.req_id] = self._new_state(child)

    @staticmethod
    def _new_state(new: NewRequestData) -> CachedRequestState:
        generator = None if new.seed is None else torch.Generator().manual_seed(new.seed)
        tokens, n = new.token_ids, new.num_prompt_tokens
        return CachedRequestState(new.req_id, list(tokens[:n]), list(tokens[n:]), new.params, generator,
                                  list(new.block_ids), new.num_computed_tokens, new.prompt_logprobs,
                                  bad_words_token_ids=new.bad_words_token_ids)

    def _update_state(self, cached: CachedRequestData) -> None:
        st = self.requests[cached.req_id]
        st.output_token_ids += cached.new_token_ids  # sampled tokens: prompts arrive whole in NewRequestData
        if cached.resumed:
            st.block_ids = list(cached.block_ids)
        else:
            st.block_ids += cached.block_ids
        st.num_computed_tokens = cached.num_computed_tokens

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens, seq_lens, tables = [], [], []
        sample_rows, samplers, chunks = [], [], []
        children: dict[SampleId, list[CachedRequestState]] = {}
        for child in out.forked_reqs:
            children.setdefault(child.fork_of, []).append(self.requests[child.req_id])
        bs = self.block_size
        for req_id, num_new in out.num_scheduled_tokens.items():
            st = self.requests[req_id]
            start, end = st.num_computed_tokens, st.num_computed_tokens + num_new
            chunks.append((st, len(ids), start, num_new))
            ids += st.tokens(start, end)
            positions += range(start, end)
            slots += [st.block_ids[p // bs] * bs + p % bs for p in range(start, end)]
            query_lens.append(num_new)
            seq_lens.append(end)
            tables.append(st.block_ids)
            if end == st.num_tokens:
                for sampler in (st, *children.get(req_id, ())):
                    sample_rows.append(len(ids) - 1)
                    samplers.append(sampler)
        as_tensor = lambda x: torch.tensor(x, dtype=torch.int64, device=self.device)  # noqa: E731
        metadata = AttentionMetadata.from_lists(query_lens, seq_lens, tables, self.block_size, self.device)
        return StepInputs(as_tensor(ids), as_tensor(positions), as_tensor(slots), metadata, sample_rows,
                          samplers, chunks)

    def _prompt_logprobs(self, inputs: StepInputs, hidden: torch.Tensor) -> dict[SampleId, list]:
        """Entries for the prompt positions first computed this step: position p's hidden state
        scores prompt token p + 1 (a recompute after preemption skips positions already scored)."""
        result = {}
        for st, row, start, length in inputs.chunks:
            if st.prompt_logprobs is None:
                continue
            end = min(start + length, st.num_prompt_tokens - 1)
            first = max(st.num_prompt_logprobs, start)
            if end <= first:
                continue
            st.num_prompt_logprobs = end  # on every rank: all of them must make the same calls
            lp = torch.log_softmax(self.model.compute_logits(hidden[row + first - start: row + end - start]), dim=-1)
            if not self.is_driver:
                continue
            top = torch.sort(lp, dim=-1, descending=True, stable=True).indices[:, :st.prompt_logprobs].tolist()
            result[st.req_id] = [logprob_entry(lp[j], st.token_at(p + 1), top[j])
                                 for j, p in enumerate(range(first, end))]
        return result

    def copy_blocks(self, copies: list[BlockCopy]) -> None:
        """Copy-on-fork: the child's copy of the parent's partly filled last block."""
        if not copies:
            return
        src = torch.tensor([c.src for c in copies], device=self.device)
        dst = torch.tensor([c.dst for c in copies], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

