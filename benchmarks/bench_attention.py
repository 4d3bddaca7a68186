"""Paged vs dense contiguous attention on CPU, at equal work (same q, same K/V values).

    .venv/bin/python -m pytest benchmarks/bench_attention.py          # timings, grouped per case

Each group times:
- paged-torch:         the torch backend (gather blocks into its reused workspace, one SDPA)
- paged-cpu:           the cpu backend: the C++ kernel reads K/V in place through the block table
                       (fast/attention/cpu_backend.py; skipped where it cannot be built)
- paged-flex:          the alternative to that kernel: FlexAttention compiled for CPU (torch.compile,
                       inductor's C++ template) over the cache as one physical sequence, the block
                       tables as a paged BlockMask (full blocks + each sequence's masked last block);
                       the mask is built outside the timed call. Skipped if it cannot compile; under
                       --benchmark-disable only the smallest case runs (each new shape compiles ~10 s)
- dense-sdpa:          the same K/V already contiguous [B, Hkv, L, D]: what paging costs is the gap
- paged-fresh-gather:  alternative: gather into a new tensor per call (no workspace)
- paged-matmul:        alternative: the workspace gather, then matmul / masked softmax / matmul
The backend keeps the fastest exact variant; the alternatives stay here as the evidence (the cpu
kernel beat paged-flex, the torch backend and dense-sdpa on every decode case with more than
0.5 MB of K/V, README Performance). Prefill groups time paged-torch, paged-cpu (the same torch path:
what "auto" runs on CPU) and dense-sdpa.
extra_info["kv_bytes"] is the K/V a kernel must read; extra_info["kv_gbps"] = kv_bytes / median
time, to set beside test_copy_bandwidth's figure (a large tensor's copy_: the machine's memory
bandwidth as torch sees it, bytes read + written).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from fast.attention import AttentionMetadata, TorchAttentionBackend
from fast.attention.cpu_backend import CpuAttentionBackend, CpuKernelUnavailable

# A small GQA model's attention (Qwen2.5-0.5B-like), fp32: what the engine runs on CPU.
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 8, 2, 64, 16
DECODE_CASES = [(batch, ctx) for batch in (1, 8, 32) for ctx in (512, 2048)] + [(64, 1024)]  # 64: the offline batch
PREFILL_CASES = [(512, 0), (512, 512)]  # (new tokens, cached context)


class PagedCase:
    """Sequences of one length, K/V both paged (shuffled blocks of a 2x pool) and contiguous."""

    def __init__(self, query_lens: list[int], seq_lens: list[int], seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        needed = [-(-n // BLOCK_SIZE) for n in seq_lens]
        num_blocks = 2 * sum(needed)
        pool = random.Random(seed).sample(range(num_blocks), sum(needed))
        self.tables = []
        for n in needed:
            self.tables.append(pool[:n])
            pool = pool[n:]
        shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        self.k_cache, self.v_cache = torch.zeros(shape), torch.zeros(shape)
        self.k_dense, self.v_dense = [], []  # per sequence [Hkv, seq_len, D]
        for table, seq_len in zip(self.tables, seq_lens):
            k = torch.randn((seq_len, NUM_KV_HEADS, HEAD_DIM), generator=gen)
            v = torch.randn((seq_len, NUM_KV_HEADS, HEAD_DIM), generator=gen)
            slots = torch.tensor([table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(seq_len)])
            self.k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots] = k
            self.v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots] = v
            self.k_dense.append(k.transpose(0, 1).contiguous())
            self.v_dense.append(v.transpose(0, 1).contiguous())
        self.q = torch.randn((sum(query_lens), NUM_HEADS, HEAD_DIM), generator=gen)
        self.metadata = AttentionMetadata.from_lists(query_lens, seq_lens, self.tables, BLOCK_SIZE)
        self.scale = HEAD_DIM**-0.5
        self.kv_bytes = 2 * sum(seq_lens) * NUM_KV_HEADS * HEAD_DIM * 4


def dense_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """All sequences equally long and contiguous, k, v: [B, Hkv, L, D]: one SDPA, no mask."""
    batch = k.shape[0]
    q = q.view(batch, NUM_KV_HEADS, NUM_HEADS // NUM_KV_HEADS, HEAD_DIM)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def paged_fresh_gather(case: PagedCase) -> torch.Tensor:
    """Alternative: index the cache into a new tensor each call, then the backend's SDPA."""
    decode = case.metadata.decode
    batch, num_blocks = decode.block_tables.shape
    length = num_blocks * BLOCK_SIZE
    k = case.k_cache[decode.block_tables].view(batch, length, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = case.v_cache[decode.block_tables].view(batch, length, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)
    visible = torch.arange(length)[None, :] < decode.seq_lens[:, None]  # [B, L]
    q = case.q.view(batch, NUM_KV_HEADS, NUM_HEADS // NUM_KV_HEADS, HEAD_DIM)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :], scale=case.scale)


def paged_matmul(backend: TorchAttentionBackend, case: PagedCase) -> torch.Tensor:
    """Alternative: workspace gather, then explicit matmul, masked fp32 softmax, matmul."""
    decode = case.metadata.decode
    batch, num_blocks = decode.block_tables.shape
    length = num_blocks * BLOCK_SIZE
    k = backend.workspace.gather_blocks("k", case.k_cache, decode.block_tables)
    v = backend.workspace.gather_blocks("v", case.v_cache, decode.block_tables)
    k = k.view(batch, length, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)  # [B, Hkv, L, D]
    v = v.view(batch, length, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)
    q = case.q.view(batch, NUM_KV_HEADS, NUM_HEADS // NUM_KV_HEADS, HEAD_DIM)
    scores = torch.matmul(q, k.transpose(-1, -2)) * case.scale  # [B, Hkv, G, L]
    visible = torch.arange(length)[None, :] < decode.seq_lens[:, None]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def cpu_backend() -> CpuAttentionBackend:
    try:
        return CpuAttentionBackend()
    except CpuKernelUnavailable as err:
        pytest.skip(str(err))


_flex_compiled = None


def flex_decode_inputs(case: PagedCase):
    """FlexAttention's view of a decode batch: q [B, Hq, 1, D]; K/V the whole cache as one sequence
    [1, Hkv, num_blocks * block_size, D] (a strided view: no copy); a BlockMask whose KV blocks are
    cache blocks: each sequence's full blocks unmasked, its last block masked to its length."""
    from torch.nn.attention.flex_attention import BlockMask

    decode = case.metadata.decode
    batch, table_width = decode.block_tables.shape
    num_blocks = case.k_cache.shape[0]
    k = case.k_cache.view(1, num_blocks * BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = case.v_cache.view(1, num_blocks * BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)
    used = (decode.seq_lens + BLOCK_SIZE - 1) // BLOCK_SIZE
    last_block = decode.block_tables.gather(1, (used - 1)[:, None])[:, 0]
    last_len = decode.seq_lens - (used - 1) * BLOCK_SIZE

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx // BLOCK_SIZE != last_block[b]) | (kv_idx % BLOCK_SIZE < last_len[b])

    partial_indices = torch.zeros(batch, 1, 1, num_blocks, dtype=torch.int32)
    partial_indices[:, 0, 0, 0] = last_block.int()
    full_indices = torch.zeros(batch, 1, 1, num_blocks, dtype=torch.int32)
    full_indices[:, 0, 0, :table_width] = decode.block_tables.int()
    # (Inductor's CPU template needs the full-block tensors: without them it does not compile.)
    mask = BlockMask.from_kv_blocks(
        torch.ones(batch, 1, 1, dtype=torch.int32), partial_indices,
        (used - 1).to(torch.int32).view(batch, 1, 1), full_indices,
        BLOCK_SIZE=(128, BLOCK_SIZE), mask_mod=mask_mod, seq_lengths=(1, num_blocks * BLOCK_SIZE),
    )
    return case.q.view(batch, NUM_HEADS, 1, HEAD_DIM), k, v, mask


def flex_runner(case: PagedCase):
    """A call of compiled FlexAttention on the case (compiled and run once here), or a skip."""
    global _flex_compiled
    try:
        from torch.nn.attention.flex_attention import flex_attention

        if _flex_compiled is None:
            _flex_compiled = torch.compile(flex_attention, dynamic=True)
        q, k, v, mask = flex_decode_inputs(case)
        run = lambda: _flex_compiled(q, k, v, block_mask=mask, scale=case.scale, enable_gqa=True)  # noqa: E731
        run()
    except Exception as err:  # noqa: BLE001 - no compiler, an inductor limitation: the case is skipped
        pytest.skip(f"FlexAttention does not compile for CPU here: {type(err).__name__}: {str(err)[:300]}")
    return run


def record_bandwidth(benchmark, nbytes: int) -> None:
    """extra_info kv_gbps = nbytes / median time (absent under --benchmark-disable: no stats)."""
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and stats.median > 0:
        benchmark.extra_info["kv_gbps"] = round(nbytes / stats.median / 1e9, 2)


def test_copy_bandwidth(benchmark) -> None:
    """The machine's copy bandwidth: copy_ of a 256 MiB fp32 tensor (far past the caches), with the
    torch threads the other benchmarks use; kv_gbps counts the bytes read + written."""
    src = torch.randn(64 * 2**20)
    dst = torch.empty_like(src)
    benchmark.group = "copy bandwidth"
    benchmark(lambda: dst.copy_(src))
    record_bandwidth(benchmark, 2 * src.numel() * src.element_size())
    assert torch.equal(dst, src)


@pytest.mark.parametrize(
    "variant", ["paged-torch", "paged-cpu", "paged-flex", "dense-sdpa", "paged-fresh-gather", "paged-matmul"])
@pytest.mark.parametrize(("batch", "ctx"), DECODE_CASES)
def test_decode_attention(benchmark, batch: int, ctx: int, variant: str) -> None:
    if variant == "paged-flex" and benchmark.disabled and (batch, ctx) != DECODE_CASES[0]:
        pytest.skip("smoke mode: paged-flex runs on the smallest case only (a compile per shape)")
    case = PagedCase([1] * batch, [ctx] * batch)
    backend = TorchAttentionBackend()
    paged_cpu = cpu_backend() if variant == "paged-cpu" else None
    paged_flex = flex_runner(case) if variant == "paged-flex" else None
    k_dense, v_dense = torch.stack(case.k_dense), torch.stack(case.v_dense)  # [B, Hkv, L, D]
    run = {
        "paged-torch": lambda: backend.forward(case.q, case.k_cache, case.v_cache, case.metadata, case.scale),
        "paged-cpu": lambda: paged_cpu.forward(case.q, case.k_cache, case.v_cache, case.metadata, case.scale),
        "paged-flex": paged_flex,
        "dense-sdpa": lambda: dense_decode(case.q, k_dense, v_dense, case.scale),
        "paged-fresh-gather": lambda: paged_fresh_gather(case),
        "paged-matmul": lambda: paged_matmul(backend, case),
    }[variant]
    benchmark.group = f"decode batch={batch} ctx={ctx}"
    benchmark.extra_info["kv_bytes"] = case.kv_bytes
    out = benchmark(run).reshape(batch, NUM_HEADS, HEAD_DIM)
    record_bandwidth(benchmark, case.kv_bytes)
    expected = dense_decode(case.q, k_dense, v_dense, case.scale).reshape(batch, NUM_HEADS, HEAD_DIM)
    torch.testing.assert_close(out, expected, atol=3e-5, rtol=3e-5)  # every variant is exact


@pytest.mark.parametrize("variant", ["paged-torch", "paged-cpu", "dense-sdpa"])
@pytest.mark.parametrize(("new_tokens", "context"), PREFILL_CASES)
def test_prefill_attention(benchmark, new_tokens: int, context: int, variant: str) -> None:
    """paged-cpu runs a prefill chunk on the torch path (gather + SDPA) too: tracked as what
    attention_backend="auto" runs on CPU."""
    seq_len = new_tokens + context
    case = PagedCase([new_tokens], [seq_len])
    backend = cpu_backend() if variant == "paged-cpu" else TorchAttentionBackend()
    group = NUM_HEADS // NUM_KV_HEADS
    visible = torch.ones(new_tokens, seq_len, dtype=torch.bool).tril(diagonal=context)  # [q, k]
    q_dense = case.q.transpose(0, 1)  # [Hq, q, D]
    k_dense = case.k_dense[0].repeat_interleave(group, dim=0)  # [Hq, L, D]
    v_dense = case.v_dense[0].repeat_interleave(group, dim=0)
    run = {
        "paged-torch": lambda: backend.forward(case.q, case.k_cache, case.v_cache, case.metadata, case.scale),
        "paged-cpu": lambda: backend.forward(case.q, case.k_cache, case.v_cache, case.metadata, case.scale),
        "dense-sdpa": lambda: F.scaled_dot_product_attention(
            q_dense, k_dense, v_dense, attn_mask=visible, scale=case.scale
        ).transpose(0, 1),
    }[variant]
    benchmark.group = f"prefill new={new_tokens} context={context}"
    benchmark.extra_info["kv_bytes"] = case.kv_bytes
    benchmark(run)
