"""The prepacked CPU GEMM (fast/worker/linear_kernel.py): same numbers as the oracle, layer by
layer and for whole models; the engine packs on CPU and releases the dense copies."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from conformance.compare import LOGIT_ATOL, assert_close
from fast.attention import get_backend
from fast.worker import linear_kernel
from fast.worker.model import PagedDecoder
from fast.worker.parallel import (
    ColumnParallelLinear,
    ParallelContext,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from ref.model import load_model
from ref.models import tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
SINGLE = ParallelContext.single()


def _filled(layer: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return layer


@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_packed_layer_equals_dense_linear(kind, bias, rows):
    make = ColumnParallelLinear if kind == "column" else RowParallelLinear
    layer = _filled(make(96, 40, bias, SINGLE))
    weight, b = layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone()
    x = torch.randn(rows, 96)
    expected = x.double() @ weight.double().T + (0 if b is None else b.double())
    assert layer.prepack_weight()
    assert layer.weight.numel() == 0, "the dense copy is released after packing"
    assert_close(f"{kind} packed", layer(x), expected, atol=1e-4)


def test_strided_input_gives_the_same_result():
    layer = _filled(ColumnParallelLinear(64, 32, False, SINGLE))
    dense = layer.weight.detach().clone()
    layer.prepack_weight()
    wide = torch.randn(5, 128)
    assert_close("strided input", layer(wide[:, 1::2]), wide[:, 1::2] @ dense.T, atol=1e-4)


def test_tied_lm_head_keeps_the_embedding_dense():
    embed = _filled(VocabParallelEmbedding(50, 16, SINGLE))
    head = ParallelLMHead(50, 16, SINGLE, tie_to=embed)
    dense = embed.weight.detach().clone()
    assert head.prepack_weight()
    assert torch.equal(embed.weight, dense), "the embedding lookup still reads the tied weight"
    h = torch.randn(4, 16)
    assert_close("tied lm_head", head(h), h @ dense.T, atol=1e-4)
    assert torch.equal(embed(torch.tensor([3, 49])), dense[[3, 49]])


def test_what_can_be_packed():
    assert linear_kernel.can_prepack(torch.zeros(4, 4))
    assert not linear_kernel.can_prepack(torch.zeros(4, 4, dtype=torch.float16))
    assert not linear_kernel.can_prepack(torch.zeros(4, 4, device="meta"))
    assert not linear_kernel.can_prepack(torch.zeros(4))
    layer = _filled(ColumnParallelLinear(8, 8, False, SINGLE, dtype=torch.float16))
    assert not layer.prepack_weight() and layer.packed_weight is None
    x = torch.randn(2, 8, dtype=torch.float16)
    assert torch.equal(layer(x), F.linear(x, layer.weight))  # unpacked layers keep F.linear


@pytest.mark.parametrize("family,overrides", [
    ("llama", {}),
    ("qwen2", {}),  # q/k/v biases
    ("qwen3", {}),  # q/k norms
    ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
])
def test_packed_model_matches_the_oracle(family, overrides):
    """Teacher-forced logits of the packed fast model vs the oracle's (an independent forward)."""
    path = tiny_checkpoint(family, **overrides)
    model = PagedDecoder.from_pretrained(path, "float32")
    assert model.prepack_weights() == 4 * len(model.layers) + 1
    ids = [5, 77, 301, 12, 9, 480, 33, 250, 101, 7, 400, 3]
    got = model.teacher_forced_logits(ids, get_backend("torch", "cpu"), block_size=4)
    with torch.inference_mode():
        expected = load_model(path, "float32").teacher_forced_logits(ids)
    assert_close(f"{family} packed logits", got, expected, atol=LOGIT_ATOL[torch.float32])


def test_the_engine_packs_on_cpu():
    from fast import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint("llama")), attention_backend="torch"))
    try:
        model = engine.executor.driver_worker.model
        assert all(layer.qkv.packed_weight is not None and layer.down_proj.packed_weight is not None
                   for layer in model.layers)
        assert model.logits_head.packed_weight is not None
    finally:
        engine.shutdown()
