"""The attention registry and the metadata builder: names, validation, derived fields."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given

from fast.attention import AttentionMetadata, TorchAttentionBackend, get_backend
from conformance.kernels import BatchSpec, batch_specs


def test_get_backend_auto_on_cpu_is_the_cpu_kernel_else_torch() -> None:
    """"auto" on CPU is the C++ kernel backend where it builds; else the torch one, with a warning
    (tests/test_attention_cpu.py plants the failing build)."""
    from fast.attention.cpu_backend import CpuAttentionBackend, CpuKernelUnavailable, load_kernel

    try:
        load_kernel()
    except CpuKernelUnavailable:
        with pytest.warns(RuntimeWarning, match="uses the torch backend"):
            assert type(get_backend("auto", "cpu")) is TorchAttentionBackend
    else:
        assert isinstance(get_backend("auto", "cpu"), CpuAttentionBackend)
    assert type(get_backend("torch")) is TorchAttentionBackend


def test_get_backend_unknown_name_lists_allowed() -> None:
    with pytest.raises(ValueError, match="allowed: auto, torch, triton"):
        get_backend("flash")


def test_importing_fast_attention_does_not_import_triton() -> None:
    """TRITON_INTERPRET is read when the kernels are defined, so triton must load lazily."""
    code = "import sys, fast.attention; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("query_lens", "seq_lens", "tables", "match"),
    [
        ([], [], [], "empty"),
        ([1, 1], [3], [[0], [1]], "differ in length"),
        ([0], [3], [[0]], "sequence 0: need 1 <= query_len"),
        ([4], [3], [[0]], "sequence 0: need 1 <= query_len"),
        ([1, 1], [3, 9], [[0], [1]], "sequence 1: block_tables row has 1 blocks"),
        ([1], [3], [[-1]], "negative block id"),
    ],
)
def test_metadata_from_lists_rejects_bad_input(query_lens, seq_lens, tables, match) -> None:
    with pytest.raises(ValueError, match=match):
        AttentionMetadata.from_lists(query_lens, seq_lens, tables, block_size=8)


def test_metadata_rejects_wrong_tensor_dtype() -> None:
    good = AttentionMetadata.from_lists([1], [3], [[0]], block_size=8)
    with pytest.raises(ValueError, match="seq_lens: expected torch.int32"):
        AttentionMetadata(**{**good.__dict__, "seq_lens": good.seq_lens.long()})


@given(batch_specs())
def test_metadata_partitions_sequences_into_decodes_and_chunks(spec: BatchSpec) -> None:
    """Every sequence is a decode (query_len 1) or a chunk, once; the tensors match the lists."""
    query_lens = [s.query_len for s in spec.seqs]
    seq_lens = [s.seq_len for s in spec.seqs]
    meta = AttentionMetadata.from_lists(query_lens, seq_lens, [list(s.blocks) for s in spec.seqs], spec.block_size)
    meta.check_invariants()
    cu = [0]
    for n in query_lens:
        cu.append(cu[-1] + n)
    assert meta.cu_seqlens_q.tolist() == cu
    assert meta.seq_lens.tolist() == seq_lens
    assert meta.num_tokens == cu[-1] and meta.max_query_len == max(query_lens)
    decode_rows = meta.decode.query_rows.tolist()
    chunk_seqs = [c.seq_index for c in meta.chunks]
    assert decode_rows == [cu[i] for i, n in enumerate(query_lens) if n == 1]
    assert chunk_seqs == [i for i, n in enumerate(query_lens) if n > 1]
    for row, table in zip(decode_rows, meta.decode.block_tables.tolist()):
        i = cu.index(row)
        assert table[: len(spec.seqs[i].blocks)] == list(spec.seqs[i].blocks)
    assert meta.decode.block_tables.shape[1] * spec.block_size >= meta.decode.max_seq_len
    assert all(torch.equal(meta.block_tables[i, : len(s.blocks)], torch.tensor(s.blocks, dtype=torch.int32))
               for i, s in enumerate(spec.seqs))
