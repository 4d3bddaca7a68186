"""Paged attention in Triton: the store kernel, the unified attention kernel, and their launchers.

Runs on a CUDA GPU, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 must be
set before this module is imported: `triton.jit` decides at definition time).

Unified attention: one program per (sequence, block of BLOCK_Q of its queries, kv head [, KV
segment]). Its BLOCK_M = BLOCK_Q * HEADS_PADDED rows are the BLOCK_Q queries times the query heads
that share the kv head (GQA), query-major:

    row r:  query q_block * BLOCK_Q + r // HEADS_PADDED,  head kv_head * GROUP + r % HEADS_PADDED
            (rows whose query is past query_len or whose head index is >= GROUP are masked)

It walks the keys from the window start of its first query to its last query in tiles of TILE
positions (a tile may span several cache blocks: each position looks up its own block), with an
online softmax in fp32 (base 2). Split-KV (NUM_SEGMENTS > 1, for long-context decode with few
programs): segment s of a program takes its share of the tiles and writes unnormalised partials
(max, sum, acc); `_reduce_segments_kernel` combines them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fast.attention.backend import AttentionBackend, check_forward_args, check_store_kv_args
from fast.attention.metadata import AttentionMetadata

LOG2_E = 1.4426950408889634
MIN_DOT_SIZE = 16  # tl.dot needs every operand dimension >= 16 on GPUs
DECODE_BLOCK_M = 16  # rows per program when every query_len is 1 (the minimum a dot takes)
PREFILL_BLOCK_M = 64  # rows per program otherwise
MIN_TILE = 32  # key positions per inner-loop step (at least one cache block)
MAX_SEGMENTS = 16  # split-KV: most segments per program
KEYS_PER_SEGMENT = 256  # split-KV: a segment below this many keys costs more than it saves


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_key_t,
    stride_key_h,
    stride_value_t,
    stride_value_h,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PADDED: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
):
    """One program per token: copy its K and V rows [num_kv_heads, head_dim] into its slot."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, HEADS_PADDED)[:, None]
    dims = tl.arange(0, HEAD_DIM_PADDED)[None, :]
    if slot >= 0:  # a negative slot is a padding token
        mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
        key = tl.load(key_ptr + token * stride_key_t + heads * stride_key_h + dims, mask=mask)
        value = tl.load(value_ptr + token * stride_value_t + heads * stride_value_h + dims, mask=mask)
        cache_offsets = slot * (NUM_KV_HEADS * HEAD_DIM) + heads * HEAD_DIM + dims  # contiguous cache
        tl.store(k_cache_ptr + cache_offsets, key, mask=mask)
        tl.store(v_cache_ptr + cache_offsets, value, mask=mask)


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    cu_seqlens_q_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    qk_scale_log2,
    sliding_window,
    stride_q_t,
    stride_q_h,
    stride_out_t,
    stride_out_h,
    stride_block_table,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEADS_PADDED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Attention of BLOCK_Q queries x GROUP heads of one sequence over one kv head's cache."""
    BLOCK_M: tl.constexpr = BLOCK_Q * HEADS_PADDED
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs at least 16 rows")
    tl.static_assert(TILE >= 16, "tl.dot needs at least 16 key positions")
    tl.static_assert(HEAD_DIM_PADDED >= HEAD_DIM, "HEAD_DIM_PADDED must cover HEAD_DIM")
    seq = tl.program_id(0)
    q_block = tl.program_id(1)
    kv_head = tl.program_id(2) // NUM_SEGMENTS
    segment = tl.program_id(2) % NUM_SEGMENTS

    q_start = tl.load(cu_seqlens_q_ptr + seq)
    query_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len

    rows = tl.arange(0, BLOCK_M)
    q_index = q_block * BLOCK_Q + rows // HEADS_PADDED  # query within the sequence
    head_in_group = rows % HEADS_PADDED
    row_valid = (q_index < query_len) & (head_in_group < GROUP)
    head = kv_head * GROUP + head_in_group
    token = (q_start + q_index).to(tl.int64)
    q_pos = context_len + q_index
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_valid = dims < HEAD_DIM
    q = tl.load(
        q_ptr + token[:, None] * stride_q_t + head[:, None] * stride_q_h + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    if UPCAST_DOT:
        q = q.to(tl.float32)

    # Keys this query block needs: [window start of its first query, its last query].
    first_pos = context_len + q_block * BLOCK_Q
    kv_end = tl.minimum(first_pos + BLOCK_Q, seq_len)
    kv_start = 0
    if USE_WINDOW:
        kv_start = tl.maximum(first_pos - sliding_window + 1, 0)
    tile_lo = kv_start // TILE
    tile_hi = tl.cdiv(kv_end, TILE)
    if NUM_SEGMENTS > 1:
        tiles_per_segment = tl.cdiv(tile_hi - tile_lo, NUM_SEGMENTS)
        tile_lo = tile_lo + segment * tiles_per_segment
        tile_hi = tl.minimum(tile_lo + tiles_per_segment, tile_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the log2-scaled scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], tl.float32)
    offsets = tl.arange(0, TILE)
    for tile in range(tile_lo, tile_hi):
        k_pos = tile * TILE + offsets
        k_valid = k_pos < kv_end
        block = tl.load(
            block_tables_ptr + seq * stride_block_table + k_pos // BLOCK_SIZE, mask=k_valid, other=0
        ).to(tl.int64)
        slot = block * BLOCK_SIZE + k_pos % BLOCK_SIZE
        kv_offsets = slot[:, None] * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + dims[None, :]
        kv_mask = k_valid[:, None] & dim_valid[None, :]
        k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)  # [TILE, HEAD_DIM_PADDED]
        v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)  # [TILE, HEAD_DIM_PADDED]
        if UPCAST_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK_M, TILE]
        visible = row_valid[:, None] & k_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - sliding_window)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SEGMENTS == 1:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        tl.store(
            out_ptr + token[:, None] * stride_out_t + head[:, None] * stride_out_h + dims[None, :],
            (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & dim_valid[None, :],
        )
    else:
        part = (token * (NUM_KV_HEADS * GROUP) + head) * NUM_SEGMENTS + segment  # [BLOCK_M]
        tl.store(part_max_ptr + part, m_i, mask=row_valid)
        tl.store(part_sum_ptr + part, l_i, mask=row_valid)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_PADDED + dims[None, :], acc, mask=row_valid[:, None])


@triton.jit
def _reduce_segments_kernel(
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    stride_out_t,
    stride_out_h,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
):
    """One program per (token, head): merge the split-KV partials into the normalised output."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    segments = tl.arange(0, NUM_SEGMENTS)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    part = (token * NUM_HEADS + head) * NUM_SEGMENTS + segments  # [NUM_SEGMENTS]
    seg_max = tl.load(part_max_ptr + part)
    seg_sum = tl.load(part_sum_ptr + part)
    seg_acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM_PADDED + dims[None, :])
    m = tl.max(seg_max, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weight = tl.exp2(seg_max - m_safe)  # empty segments (max -inf) weigh 0
    total = tl.sum(seg_sum * weight, axis=0)
    total = tl.where(total == 0.0, 1.0, total)
    result = tl.sum(seg_acc * weight[:, None], axis=0) / total
    tl.store(
        out_ptr + token * stride_out_t + head * stride_out_h + dims,
        result.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


# Whether the kernels above run in the interpreter: fixed when they were defined.
INTERPRETED = not isinstance(_paged_attention_kernel, triton.runtime.JITFunction)


@dataclass(frozen=True)
class AttentionLaunch:
    """Compile-time shape of one attention launch, derived from the batch and the cache."""

    group: int  # query heads per kv head
    heads_padded: int
    head_dim_padded: int
    block_q: int
    tile: int
    num_segments: int


class TritonAttentionBackend(AttentionBackend):
    """Triton kernels; on CPU tensors only under the interpreter.

    num_kv_splits: split-KV segments per program; None chooses per step (on CUDA, decode-only
    steps with fewer programs than SMs and long contexts); 1 disables; else a power of two <= 16.
    """

    name = "triton"

    def __init__(self, device: torch.device | str = "cuda", num_kv_splits: int | None = None) -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda" and not INTERPRETED:
            raise RuntimeError(
                f"the triton attention backend on {self.device} needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before fast.attention.triton_backend is first imported"
            )
        if num_kv_splits is not None and (
            not 1 <= num_kv_splits <= MAX_SEGMENTS or num_kv_splits & (num_kv_splits - 1)
        ):
            raise ValueError(f"num_kv_splits must be None or a power of two in 1..{MAX_SEGMENTS}, got {num_kv_splits}")
        self.num_kv_splits = num_kv_splits

    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        check_store_kv_args(key, value, k_cache, v_cache, slot_mapping)
        key = key if key.stride(2) == 1 else key.contiguous()
        value = value if value.stride(2) == 1 else value.contiguous()
        num_tokens = key.shape[0]
        if num_tokens == 0:
            return
        _, _, num_kv_heads, head_dim = k_cache.shape
        _store_kv_kernel[(num_tokens,)](
            key, value, k_cache, v_cache, slot_mapping,
            key.stride(0), key.stride(1), value.stride(0), value.stride(1),
            NUM_KV_HEADS=num_kv_heads,
            HEAD_DIM=head_dim,
            HEADS_PADDED=triton.next_power_of_2(num_kv_heads),
            HEAD_DIM_PADDED=triton.next_power_of_2(head_dim),
        )

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_forward_args(q, k_cache, v_cache, metadata, sliding_window, out)
        if out is None:
            out = torch.empty_like(q)
        launch = self._launch_shape(q.shape[1], tuple(k_cache.shape), metadata, q.device)
        num_heads = q.shape[1]
        num_kv_heads = k_cache.shape[2]
        if launch.num_segments > 1:
            part_shape = (metadata.num_tokens, num_heads, launch.num_segments)
            part_max = torch.empty(part_shape, dtype=torch.float32, device=q.device)
            part_sum = torch.empty(part_shape, dtype=torch.float32, device=q.device)
            part_acc = torch.empty((*part_shape, launch.head_dim_padded), dtype=torch.float32, device=q.device)
        else:  # not read: the kernel writes `out` directly
            part_max = part_sum = part_acc = out
        grid = (
            metadata.num_seqs,
            triton.cdiv(metadata.max_query_len, launch.block_q),
            num_kv_heads * launch.num_segments,
        )
        _paged_attention_kernel[grid](
            q, k_cache, v_cache, out, part_acc, part_max, part_sum,
            metadata.cu_seqlens_q, metadata.seq_lens, metadata.block_tables,
            scale * LOG2_E, sliding_window or 0,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), metadata.block_tables.stride(0),
            NUM_KV_HEADS=num_kv_heads,
            GROUP=launch.group,
            HEADS_PADDED=launch.heads_padded,
            HEAD_DIM=q.shape[2],
            HEAD_DIM_PADDED=launch.head_dim_padded,
            BLOCK_SIZE=k_cache.shape[1],
            TILE=launch.tile,
            BLOCK_Q=launch.block_q,
            NUM_SEGMENTS=launch.num_segments,
            USE_WINDOW=sliding_window is not None,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            # The interpreter (triton 3.9) multiplies bf16 dot operands as their raw uint16 bits.
            UPCAST_DOT=INTERPRETED and q.dtype == torch.bfloat16,
        )
        if launch.num_segments > 1:
            _reduce_segments_kernel[(metadata.num_tokens, num_heads)](
                out, part_acc, part_max, part_sum, out.stride(0), out.stride(1),
                NUM_HEADS=num_heads,
                HEAD_DIM=q.shape[2],
                HEAD_DIM_PADDED=launch.head_dim_padded,
                NUM_SEGMENTS=launch.num_segments,
            )
        return out

    def launch_shape(
        self, num_heads: int, cache_shape: tuple[int, int, int, int], metadata: AttentionMetadata
    ) -> AttentionLaunch:
        """The launch `forward` chooses on this backend's device for q with `num_heads` heads over
        a cache of `cache_shape` ([num_blocks, block_size, num_kv_heads, head_dim]).

        A pure function of sizes (no tensor is read), so a test can tell which kernel path a batch
        takes (split-KV, decode row block, tiles per program) without running it.
        """
        return self._launch_shape(num_heads, cache_shape, metadata, self.device)

    def with_kv_splits(self, num_kv_splits: int | None) -> TritonAttentionBackend:
        """A twin of this backend on the same device with `num_kv_splits` fixed (see the class doc):
        reaches the split-KV path where the automatic choice would not (on CPU, short contexts)."""
        return TritonAttentionBackend(self.device, num_kv_splits)

    def _launch_shape(
        self, num_heads: int, cache_shape: tuple[int, ...], metadata: AttentionMetadata, device: torch.device
    ) -> AttentionLaunch:
        """Block sizes for this step: decode-only steps get the smallest row block."""
        if device.type != "cuda" and not INTERPRETED:
            raise RuntimeError(f"triton kernels on {device} need TRITON_INTERPRET=1 set before import")
        _, block_size, num_kv_heads, head_dim = cache_shape
        group = num_heads // num_kv_heads
        heads_padded = triton.next_power_of_2(group)
        block_m = max(DECODE_BLOCK_M if metadata.max_query_len == 1 else PREFILL_BLOCK_M, heads_padded)
        return AttentionLaunch(
            group=group,
            heads_padded=heads_padded,
            head_dim_padded=max(MIN_DOT_SIZE, triton.next_power_of_2(head_dim)),
            block_q=block_m // heads_padded,
            tile=max(MIN_TILE, triton.next_power_of_2(block_size)),
            num_segments=self.kv_splits_for(device, num_kv_heads, metadata),
        )

    def kv_splits_for(self, device: torch.device, num_kv_heads: int, metadata: AttentionMetadata) -> int:
        """Split-KV segments for this step. Splitting only pays when the step has too few programs to fill the GPU and long contexts."""
        if self.num_kv_splits is not None:
            return self.num_kv_splits
        if device.type != "cuda" or metadata.max_query_len > 1:
            return 1
        programs = metadata.num_seqs * num_kv_heads
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        by_occupancy = 2 * sms // programs
        by_length = metadata.max_seq_len // KEYS_PER_SEGMENT
        segments = min(MAX_SEGMENTS, by_occupancy, by_length)
        return 1 if segments < 2 else 2 ** int(math.log2(segments))
