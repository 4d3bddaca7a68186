"""benchmarks.gguf_export: the GGUF file read back holds the checkpoint, as llama.cpp's llama arch
reads it; and (when llama_cpp is installed) llama.cpp's greedy tokens equal HF's `generate`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # in the dev extra; pure Python

from benchmarks import gguf_export, llamacpp_peer  # noqa: E402
from ref.models import tiny_checkpoint  # noqa: E402

LLAMA_KEYS = {  # what llama.cpp's llama arch reads, and the HF config field it comes from
    "llama.context_length": "max_position_embeddings", "llama.embedding_length": "hidden_size",
    "llama.block_count": "num_hidden_layers", "llama.feed_forward_length": "intermediate_size",
    "llama.attention.head_count": "num_attention_heads", "llama.attention.head_count_kv": "num_key_value_heads",
    "llama.attention.key_length": "head_dim", "llama.attention.value_length": "head_dim",
    "llama.rope.dimension_count": "head_dim", "llama.vocab_size": "vocab_size",
}


def _field(reader, key):
    f = reader.get_field(key)
    assert f is not None, f"{key} missing"
    return f.contents()


def _checkpoint_tensors(model_dir) -> dict[str, np.ndarray]:
    return gguf_export.load_state_dict(model_dir)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The tiny llama with a tokenizer (byte-level BPE) and, as the benchmark model, one without;
    GQA (4 q / 2 kv heads) so the q and k permutations differ."""
    return {"bpe": str(tiny_checkpoint("llama", seed=3)),
            "ids": str(tiny_checkpoint("llama", seed=3, tokenizer=False))}


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {(kind, dtype): gguf_export.export(d, out / f"{kind}-{dtype}.gguf", dtype)
            for kind, d in ckpt.items() for dtype in gguf_export.DTYPES}


@pytest.mark.parametrize("dtype", gguf_export.DTYPES)
def test_tensors_round_trip(ckpt, exported, dtype):
    config = json.loads((Path(ckpt["bpe"]) / "config.json").read_text())
    state = _checkpoint_tensors(ckpt["bpe"])
    reader = gguf.GGUFReader(exported["bpe", dtype])
    got = {t.name: t for t in reader.tensors}
    n_head, n_kv, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    hf_of = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(config["num_hidden_layers"]):
        names.update({f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight" for g, h in hf_of.items()})
    assert set(got) == set(names)
    assert len(names) == len(state)  # every checkpoint tensor has its place (untied lm_head included)
    for name, hf_name in names.items():
        t, want = got[name], state[hf_name]
        # ggml lists dims fastest-first; the data comes back in the HF (row-major) shape
        assert tuple(int(x) for x in t.shape) == tuple(reversed(want.shape)), name
        wide = want.ndim > 1 and dtype == "f16"
        assert t.tensor_type == (gguf.GGMLQuantizationType.F16 if wide else gguf.GGMLQuantizationType.F32), name
        data = np.asarray(t.data).astype(np.float32).reshape(want.shape)
        if ".attn_q." in name or ".attn_k." in name:
            heads = n_head if ".attn_q." in name else n_kv
            # llama.cpp's pair layout: row 2j of a head is HF row j, row 2j+1 is HF row j + d/2
            per_head = want.reshape(heads, 2, d // 2, -1)
            want = np.stack([per_head[:, 0], per_head[:, 1]], axis=2).reshape(want.shape)
        if wide:
            np.testing.assert_array_equal(data, want.astype(np.float16).astype(np.float32), err_msg=name)
        else:
            np.testing.assert_array_equal(data, want, err_msg=name)


def _rope_hf(x, pos, theta):  # x [heads, d]: rotate_half (the HF layout)
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = np.concatenate([pos * inv, pos * inv])
    rot = np.concatenate([-x[:, d // 2:], x[:, :d // 2]], axis=-1)
    return x * np.cos(ang) + rot * np.sin(ang)


def _rope_pairs(x, pos, theta):  # llama.cpp's rope NORM: (x[2i], x[2i+1]) rotated by pos * inv[i]
    d = x.shape[-1]
    ang = pos / theta ** (np.arange(0, d, 2) / d)
    a, b = x[:, 0::2], x[:, 1::2]
    out = np.empty_like(x)
    out[:, 0::2] = a * np.cos(ang) - b * np.sin(ang)
    out[:, 1::2] = a * np.sin(ang) + b * np.cos(ang)
    return out


def test_permuted_qk_give_hf_attention_scores(ckpt):
    """The permuted q/k under llama.cpp's pair rope give the same q·k as HF's under rotate_half."""
    config = json.loads((Path(ckpt["bpe"]) / "config.json").read_text())
    state = _checkpoint_tensors(ckpt["bpe"])
    tensors = gguf_export.gguf_tensors(config, state, "f32")
    n_head, n_kv, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    theta = config["rope_parameters"]["rope_theta"]
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(config["hidden_size"]), rng.standard_normal(config["hidden_size"])
    wq, wk = state["model.layers.1.self_attn.q_proj.weight"], state["model.layers.1.self_attn.k_proj.weight"]
    pq, pk = tensors["blk.1.attn_q.weight"], tensors["blk.1.attn_k.weight"]
    for qpos, kpos in [(0, 0), (7, 3), (300, 299)]:
        q_hf = _rope_hf((wq @ x).reshape(n_head, d), qpos, theta)
        k_hf = _rope_hf((wk @ y).reshape(n_kv, d), kpos, theta)
        q_gg = _rope_pairs((pq @ x).reshape(n_head, d), qpos, theta)
        k_gg = _rope_pairs((pk @ y).reshape(n_kv, d), kpos, theta)
        group = n_head // n_kv
        s_hf = np.einsum("hd,hd->h", q_hf, np.repeat(k_hf, group, axis=0))
        s_gg = np.einsum("hd,hd->h", q_gg, np.repeat(k_gg, group, axis=0))
        np.testing.assert_allclose(s_gg, s_hf, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["bpe", "ids"])
def test_metadata_llama_cpp_reads(ckpt, exported, kind):
    config = json.loads((Path(ckpt[kind]) / "config.json").read_text())
    reader = gguf.GGUFReader(exported[kind, "f32"])
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32
    assert _field(gguf.GGUFReader(exported[kind, "f16"]), "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    for key, hf_key in LLAMA_KEYS.items():
        assert _field(reader, key) == config[hf_key], key
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"], rel=1e-6)
    if kind == "ids":  # driven by token ids: llama.cpp makes vocab_size dummy tokens
        assert _field(reader, "tokenizer.ggml.model") == "no_vocab"
        assert reader.get_field("tokenizer.ggml.tokens") is None
        return
    tok = json.loads((Path(ckpt[kind]) / "tokenizer.json").read_text())
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config["vocab_size"]
    for text, i in tok["model"]["vocab"].items():
        assert tokens[i] == text
    types = _field(reader, "tokenizer.ggml.token_type")
    assert [types[i] for i in (0, 1, 2)] == [gguf.TokenType.CONTROL] * 3  # <pad> <s> </s>
    assert len(_field(reader, "tokenizer.ggml.merges")) == len(tok["model"]["merges"])
    assert _field(reader, "tokenizer.ggml.bos_token_id") == config["bos_token_id"]
    assert _field(reader, "tokenizer.ggml.eos_token_id") == config["eos_token_id"]


def test_tied_embeddings_leave_output_out(tmp_path):
    d = tiny_checkpoint("llama", seed=4, tokenizer=False, tie_word_embeddings=True)
    reader = gguf.GGUFReader(gguf_export.export(d, tmp_path / "tied.gguf"))
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names


def test_other_architectures_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}))
    with pytest.raises(ValueError, match="Llama"):
        gguf_export.export(tmp_path, tmp_path / "x.gguf")


# ----------------------------------------------------------------------------- llama.cpp itself

LLAMACPP_OK, LLAMACPP_WHY = llamacpp_peer.available()
needs_llamacpp = pytest.mark.skipif(not LLAMACPP_OK, reason=LLAMACPP_WHY)


@needs_llamacpp
@pytest.mark.parametrize("kind", ["bpe", "ids"])
def test_llamacpp_greedy_equals_hf_generate(ckpt, exported, kind):
    """fp32 weights and f32 KV cache (flash attention off: with it llama.cpp casts K/V to f16):
    llama.cpp's greedy tokens are HF `generate`'s, token for token, for several prompts and 64 new
    tokens."""
    prompts = llamacpp_peer.verify_prompts(json.loads((Path(ckpt[kind]) / "config.json").read_text())["vocab_size"],
                                           n=4, seed=5, lengths=(3, 20, 64, 150))
    expected = llamacpp_peer.hf_greedy(ckpt[kind], prompts, 64)
    with llamacpp_peer.LlamaCpp(str(exported[kind, "f32"]), kv_type="f32", flash_attn="off", n_threads=2,
                                n_ctx=256) as llm:
        assert llm.n_vocab == json.loads((Path(ckpt[kind]) / "config.json").read_text())["vocab_size"]
        for prompt, want in zip(prompts, expected):
            got = llm.greedy(prompt, 64).tokens
            assert got == want, f"first mismatch at {llamacpp_peer.first_mismatch(got, want)}"


@needs_llamacpp
def test_llamacpp_logits_close_to_hf(ckpt, exported):
    """Last-position logits of a prompt: fp32 rounding apart (measured max |diff| ~1e-6; with
    flash attention on, or an f16 cache, it is ~1e-3)."""
    from transformers import AutoModelForCausalLM

    prompt = [random.Random(9).randrange(3, 512) for _ in range(40)]
    model = AutoModelForCausalLM.from_pretrained(ckpt["ids"], dtype=torch.float32).eval()
    with torch.inference_mode():
        want = model(torch.tensor([prompt])).logits[0, -1].numpy()
    with llamacpp_peer.LlamaCpp(str(exported["ids", "f32"]), kv_type="f32", flash_attn="off", n_threads=2,
                                n_ctx=256) as llm:
        llm.reset()
        llm.prefill(prompt)
        got = llm.logits(-1)
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-5)


@needs_llamacpp
def test_llamacpp_batched_equals_sequential(ckpt, exported):
    """The multi-sequence batch driver (continuous batching, chunked prompts) gives each request
    the tokens it gets alone."""
    from benchmarks.workloads import Workload

    rng = random.Random(2)
    wl = Workload("t", [[rng.randrange(3, 512) for _ in range(rng.randint(2, 60))] for _ in range(7)],
                  [rng.randint(1, 12) for _ in range(7)], max_model_len=256)
    with llamacpp_peer.LlamaCpp(str(exported["ids", "f32"]), kv_type="f32", flash_attn="off", n_threads=2,
                                n_ctx=256) as llm:
        _, alone = llm.run_sequential(wl)
    with llamacpp_peer.LlamaCpp(str(exported["ids", "f32"]), kv_type="f32", flash_attn="off", n_threads=2,
                                n_ctx=256, n_parallel=3, n_batch=64) as llm:
        result, together = llm.run_batched(wl)
    assert together == alone
    assert result.max_concurrent == 3


@needs_llamacpp
def test_llamacpp_tokenizes_like_hf(ckpt, exported):
    """The exported gpt2 vocab (tokens, merges, gpt-2 pre-tokenizer) splits text as HF does."""
    import ctypes

    import llama_cpp as lc
    from transformers import AutoTokenizer

    from ref.models import CORPUS

    hf = AutoTokenizer.from_pretrained(ckpt["bpe"])
    with llamacpp_peer.LlamaCpp(str(exported["bpe", "f32"]), n_threads=2, n_ctx=64) as llm:
        vocab = lc.llama_model_get_vocab(llm.model)
        for text in [*CORPUS.splitlines(keepends=True)[:6], "Hello world, 12345 tokens!"]:
            raw = text.encode()
            buf = (lc.llama_token * (len(raw) + 8))()
            n = lc.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, False)
            assert list(buf[:n]) == hf(text, add_special_tokens=False)["input_ids"], text
