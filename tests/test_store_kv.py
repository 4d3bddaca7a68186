"""store_kv, every backend: what is stored reads back exactly through the block table.

Without CUDA the Triton store kernel runs in the interpreter (TRITON_INTERPRET=1 set here,
before the kernel module is imported).
"""

from __future__ import annotations

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, note  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fast.attention import AttentionBackend, get_backend  # noqa: E402
from ref.paged_reference import read_sequence, sequence_slots  # noqa: E402

DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
BACKENDS = [("torch", d) for d in DEVICES] + [("triton", "cuda" if torch.cuda.is_available() else "cpu")]


@st.composite
def store_steps(draw: st.DrawFn) -> dict:
    """A few sequences, each storing a run of new positions; some tokens are padding (slot -1)."""
    block_size = draw(st.sampled_from((8, 16, 32)))
    seqs = []  # (start position, number of new tokens)
    for _ in range(draw(st.integers(1, 3))):
        start = draw(st.integers(0, 3 * block_size))
        seqs.append((start, draw(st.integers(1, block_size + 1))))
    needed = [-(-(start + n) // block_size) for start, n in seqs]
    num_blocks = sum(needed) + draw(st.integers(0, 16))
    seed = draw(st.integers(0, 2**31 - 1))
    pool = random.Random(seed).sample(range(num_blocks), sum(needed))
    tables = []
    for n in needed:
        tables.append(pool[:n])
        pool = pool[n:]
    return dict(
        block_size=block_size,
        num_blocks=num_blocks,
        num_kv_heads=draw(st.integers(1, 4)),
        head_dim=draw(st.sampled_from((32, 64, 128, 80))),
        dtype=draw(st.sampled_from((torch.float32, torch.float16, torch.bfloat16))),
        seqs=seqs,
        tables=tables,
        padding=draw(st.lists(st.integers(0, 64), max_size=3)),  # where to insert padding tokens
        seed=seed,
    )


@pytest.mark.parametrize(("name", "device"), BACKENDS)
@given(step=store_steps())
def test_store_kv_reads_back_exactly(name: str, device: str, step: dict) -> None:
    """After storing, each sequence's new positions read back bit-exact; no other slot changes."""
    note(str({k: v for k, v in step.items() if k != "tables"}))
    backend: AttentionBackend = get_backend(name, device)
    gen = torch.Generator().manual_seed(step["seed"])
    shape = (step["num_blocks"], step["block_size"], step["num_kv_heads"], step["head_dim"])
    k_cache = torch.randn(shape, generator=gen).to(step["dtype"])
    v_cache = torch.randn(shape, generator=gen).to(step["dtype"])
    slots = []
    for (start, n), table in zip(step["seqs"], step["tables"]):
        slots += sequence_slots(table, range(start, start + n), step["block_size"])
    for where in step["padding"]:
        slots.insert(min(where, len(slots)), -1)
    new_shape = (len(slots), step["num_kv_heads"], step["head_dim"])
    key = torch.randn(new_shape, generator=gen).to(step["dtype"])
    value = torch.randn(new_shape, generator=gen).to(step["dtype"])
    k_before, v_before = k_cache.clone(), v_cache.clone()

    k_dev, v_dev = k_cache.to(device), v_cache.to(device)
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
    backend.store_kv(key.to(device), value.to(device), k_dev, v_dev, slot_mapping)
    k_after, v_after = k_dev.cpu(), v_dev.cpu()

    real = [i for i, s in enumerate(slots) if s >= 0]
    row = 0
    for (start, n), table in zip(step["seqs"], step["tables"]):
        rows = real[row : row + n]
        row += n
        assert torch.equal(read_sequence(k_after, table, start + n)[start:], key[rows]), "stored keys differ"
        assert torch.equal(read_sequence(v_after, table, start + n)[start:], value[rows]), "stored values differ"
    written = torch.zeros(step["num_blocks"] * step["block_size"], dtype=torch.bool)
    written[[s for s in slots if s >= 0]] = True
    for name_, before, after in (("k_cache", k_before, k_after), ("v_cache", v_before, v_after)):
        untouched_before = before.view(-1, *before.shape[2:])[~written]
        untouched_after = after.view(-1, *after.shape[2:])[~written]
        assert torch.equal(untouched_before, untouched_after), f"{name_}: a slot outside slot_mapping changed"


def test_store_kv_rejects_dtype_mismatch() -> None:
    cache = torch.zeros(2, 8, 1, 32)
    key = torch.zeros(1, 1, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="key:"):
        get_backend("torch").store_kv(key, key, cache, cache.clone(), torch.tensor([0]))
