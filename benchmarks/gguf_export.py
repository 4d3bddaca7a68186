"""Convert one of this project's HF Llama checkpoints to GGUF (llama.cpp's file format).

    python -m benchmarks.gguf_export MODEL_DIR OUT.gguf [--dtype f32|f16]

Only what llama.cpp's `llama` architecture reads is written, as llama.cpp's own
`convert_hf_to_gguf.py` writes it for a `LlamaForCausalLM`:

- Tensors under llama.cpp's names (token_embd, blk.N.attn_q, ..., output_norm, output). `q_proj` and
  `k_proj` rows are permuted: HF rotates the two halves of each head (rotate_half), llama.cpp's
  `llama` arch rotates adjacent pairs (rope "NORM"); the permutation turns one layout into the other
  so the attention scores are the same. With tied embeddings, `output.weight` is left out and
  llama.cpp reuses token_embd. f16 files keep the 1-D norm weights in f32 (as the converter does).
- Hyperparameters: context length, hidden size, layers, FFN size, q and kv heads, head_dim
  (key/value length and rope dimension count), rms eps, rope theta, vocab size. Rope scaling other
  than "default", biases and q/k norms are refused (not the `llama` arch llama.cpp would load).
- Vocabulary. If the checkpoint has a `tokenizer.json` (a byte-level BPE, as `ref.models` trains
  one), it is written as llama.cpp's "gpt2" BPE vocab: tokens, merges, token types (special tokens
  CONTROL), bos/eos/pad ids, pre-tokenizer "gpt-2" (the GPT-2 split regex, which is what the
  tokenizers `ByteLevel` pre-tokenizer applies), no BOS added. The benchmark checkpoint has no
  tokenizer: the benchmarks drive every engine by token ids, so the file says
  `tokenizer.ggml.model = "no_vocab"` plus `llama.vocab_size`; llama.cpp then creates that many
  dummy tokens (no text, no special ids) and works from ids alone — the minimal vocab it loads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

EXPORTER_VERSION = 1  # part of the cache key of exported files; bump when the output changes
DTYPES = ("f32", "f16")


def _config(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    archs = config.get("architectures") or []
    if config.get("model_type") not in ("llama", "mistral") or archs not in ([], ["LlamaForCausalLM"], ["MistralForCausalLM"]):
        raise ValueError(f"only Llama-architecture checkpoints are exported, got {config.get('model_type')!r} {archs}")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ValueError("biases are not exported (llama.cpp's llama arch of the converter has none)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"rope scaling {rope!r} is not exported")
    if config.get("sliding_window") not in (None, 0):
        raise ValueError("sliding-window attention is not exported")
    return config


def _rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def _head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def load_state_dict(model_dir: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint (single or sharded safetensors) as float32 numpy arrays."""
    from safetensors.numpy import load_file

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        for key, value in load_file(str(model_dir / name)).items():
            tensors[key] = value.astype(np.float32)
    return tensors


def permute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate_half row order -> llama.cpp's interleaved pairs (convert_hf_to_gguf's `permute`):
    within each head, rows [x0..x(d/2-1), y0..y(d/2-1)] become [x0, y0, x1, y1, ...]."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensors(config: dict, state: dict[str, np.ndarray], dtype: str = "f32") -> dict[str, np.ndarray]:
    """The tensors of the GGUF file, by llama.cpp name, in the row-major (HF) shape the writer takes."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    per_layer = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    out: dict[str, np.ndarray] = {}
    seen: set[str] = set()

    def put(hf_name: str, gguf_name: str, transform=None) -> None:
        value = state[hf_name]
        seen.add(hf_name)
        if transform is not None:
            value = transform(value)
        if dtype == "f16" and value.ndim > 1:
            value = value.astype(np.float16)
        out[gguf_name] = np.ascontiguousarray(value)

    put("model.embed_tokens.weight", "token_embd.weight")
    for i in range(config["num_hidden_layers"]):
        for hf, gg in per_layer.items():
            transform = None
            if hf == "self_attn.q_proj":
                transform = lambda w: permute_qk(w, n_head)  # noqa: E731
            elif hf == "self_attn.k_proj":
                transform = lambda w: permute_qk(w, n_kv)  # noqa: E731
            put(f"model.layers.{i}.{hf}.weight", f"blk.{i}.{gg}.weight", transform)
    put("model.norm.weight", "output_norm.weight")
    if not config.get("tie_word_embeddings", False):
        put("lm_head.weight", "output.weight")
    else:
        seen.add("lm_head.weight")
    left = sorted(k for k in state if k not in seen and not k.endswith("rotary_emb.inv_freq"))
    if left:
        raise ValueError(f"checkpoint tensors the llama arch has no place for: {left[:5]}")
    return out


def _add_vocab(writer, model_dir: Path, config: dict) -> str:
    import gguf

    vocab_size = config["vocab_size"]
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        writer.add_tokenizer_model("no_vocab")
        return "no_vocab"
    tok = json.loads(path.read_text())
    model = tok["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"only byte-level BPE tokenizers are exported, got {model.get('type')!r}")
    vocab: dict[str, int] = dict(model["vocab"])
    special = {}
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special[added["id"]] = added["content"]
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer ids reach {max(vocab.values())}, model vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        if isinstance(config.get(key), int):
            add(config[key])
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    return "gpt2"


def export(model_dir: str | Path, out_path: str | Path, dtype: str = "f32") -> Path:
    """Write `model_dir` as a GGUF file at `out_path` (f32 or f16 weights); returns the path."""
    import gguf

    model_dir, out_path = Path(model_dir), Path(out_path)
    config = _config(model_dir)
    tensors = gguf_tensors(config, load_state_dict(model_dir), dtype)
    head_dim = _head_dim(config)

    writer = gguf.GGUFWriter(str(out_path), "llama")
    writer.add_name(model_dir.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    _add_vocab(writer, model_dir, config)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def cached_export(model_dir: str | Path, dtype: str = "f32", cache_dir: str | Path | None = None) -> Path:
    """The GGUF file of `model_dir` in `dtype`, exported once into the pagedlm cache and reused
    (keyed by the checkpoint's files and EXPORTER_VERSION; written to a temp file, then renamed)."""
    from ref.models import default_cache_dir

    model_dir = Path(model_dir)
    h = hashlib.sha256(f"{EXPORTER_VERSION}:{dtype}".encode())
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "gguf"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{model_dir.name}-{dtype}-{h.hexdigest()[:12]}.gguf"
    if path.is_file():
        return path
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=root)
    os.close(fd)
    try:
        export(model_dir, tmp, dtype)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--dtype", choices=DTYPES, default="f32")
    args = parser.parse_args(argv)
    print(export(args.model_dir, args.out, args.dtype))


if __name__ == "__main__":
    main()
