"""Model runner: turns a step's schedule into one flattened batch and runs the model once.

Per step it builds, for the scheduled sequences in order (no padding):

    input_ids, positions, slot_mapping : [num_tokens]   (chunk of seq 0 | chunk of seq 1 | ...)
    AttentionMetadata                  : cu_seqlens_q, seq_lens, block_tables
    sample_rows                        : the last token row of each sequence whose chunk reaches
                                         the end of its tokens (it samples this step)

and returns the final hidden states of only the rows that need logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fast.attention import AttentionBackend, AttentionMetadata
from fast.core.kv_cache_manager import BlockCopy, KVCacheManager
from fast.worker.model import PagedDecoder
from fast.core.scheduler import ScheduledRequest


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # int64 [N]
    positions: torch.Tensor  # int64 [N]
    slot_mapping: torch.Tensor  # int64 [N]
    metadata: AttentionMetadata
    sample_rows: list[int]  # row of each sampling sequence's last token
    samplers: list[ScheduledRequest]  # the sequences that sample, in sample_rows order


def kv_bytes_per_block(model: PagedDecoder, block_size: int) -> int:
    cfg = model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
    return per_token * block_size * model.dtype.itemsize


class ModelRunner:
    def __init__(self, model: PagedDecoder, num_blocks: int, block_size: int, backend: AttentionBackend,
                 device: torch.device | str = "cpu"):
        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.backend = backend
        self.device = torch.device(device)
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        # Zeros, not empty: backends may read (and mask) slots no sequence has written yet.
        self.kv_caches = [
            (torch.zeros(shape, dtype=model.dtype, device=self.device),
             torch.zeros(shape, dtype=model.dtype, device=self.device))
            for _ in range(cfg.num_hidden_layers)
        ]

    def copy_blocks(self, copies: list[BlockCopy]) -> None:
        """Copy-on-fork: the child's copy of the parent's partly filled last block."""
        if not copies:
            return
        src = torch.tensor([c.src for c in copies], device=self.device)
        dst = torch.tensor([c.dst for c in copies], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    def prepare(self, scheduled: list[ScheduledRequest], kv: KVCacheManager) -> StepInputs:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens, seq_lens, tables = [], [], []
        sample_rows, samplers = [], []
        for s in scheduled:
            r, start, end = s.request, s.start, s.start + s.num_new_tokens
            ids += r.token_ids[start:end]
            positions += range(start, end)
            slots += kv.slot_mapping(r.request_id, start, end)
            query_lens.append(end - start)
            seq_lens.append(end)
            tables.append(kv.get_block_table(r.request_id))
            if end == r.num_tokens:
                sample_rows.append(len(ids) - 1)
                samplers.append(s)
        as_tensor = lambda x: torch.tensor(x, dtype=torch.int64, device=self.device)  # noqa: E731
        metadata = AttentionMetadata.from_lists(query_lens, seq_lens, tables, self.block_size, self.device)
        return StepInputs(as_tensor(ids), as_tensor(positions), as_tensor(slots), metadata, sample_rows, samplers)

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """Run the model over the step's tokens; returns hidden states [N, hidden]."""
        return self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.slot_mapping,
                          inputs.metadata, self.backend)
