"""The reference decoder: Llama, Mistral (full attention), Qwen2 and Qwen3 in one plain module.

Family differences are three switches on `ModelConfig`: `attention_bias` (Qwen2 biases q/k/v),
`qk_norm` (Qwen3 RMSNorms q and k over head_dim before RoPE) and `tie_word_embeddings`.
Parameter names mirror the Hugging Face checkpoints, so loading is a checked name-for-name copy.
This is the oracle: plain PyTorch, a shape comment at every reshape, nothing clever.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ref.attention import causal_mask, dense_attention
from ref.config import ModelConfig, rope_inv_freq


class KVCache:
    """Contiguous K/V per batch row, indexed by token position.

    k, v: [num_layers, B, Hkv, max_len, D]. Row b's token at position p lives at index p;
    indices past what a row has written hold garbage that the causal mask never reads.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len,
                 config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.max_len = max_len

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, T, Hkv, D] of tokens at `positions` [B, T]."""
        assert int(positions.max()) < self.max_len, (int(positions.max()), self.max_len)
        B, T, H, D = k.shape
        index = positions[:, None, :, None].expand(B, H, T, D)  # [B, Hkv, T, D]
        self.k[layer].scatter_(2, index, k.transpose(1, 2))
        self.v[layer].scatter_(2, index, v.transpose(1, 2))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32, scale in the model dtype (as transformers does).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rope(nn.Module):
    """Rotary embedding: cos/sin [B, T, D] for integer positions [B, T]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos, sin: [B, T, D]."""
    return x * cos[:, :, None, :] + rotate_half(x) * sin[:, :, None, :]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        hid, qd, kvd = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hid, qd, bias=config.attention_bias)
        self.k_proj = nn.Linear(hid, kvd, bias=config.attention_bias)
        self.v_proj = nn.Linear(hid, kvd, bias=config.attention_bias)
        self.o_proj = nn.Linear(qd, hid, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x, positions, cos, sin, cache: KVCache, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)  # [B, T, Hq, D]
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.write(layer, positions, k, v)
        k_positions = torch.arange(cache.max_len)
        mask = causal_mask(positions, k_positions)  # [B, T, max_len]
        out = dense_attention(
            q.transpose(1, 2), cache.k[layer], cache.v[layer], mask, self.scale
        )  # [B, Hq, T, D]
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # [B, T, Hq*D]
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hid, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hid, inter, bias=bias)
        self.up_proj = nn.Linear(hid, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hid, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, positions, cos, sin, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), positions, cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    """Causal LM. `forward` returns final hidden states; `compute_logits` maps them to fp32 logits."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.rope = Rope(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """input_ids, positions: [B, T] -> hidden [B, T, hidden]; writes K/V into `cache`."""
        x = self.model.embed_tokens(input_ids)  # [B, T, hidden]
        cos, sin = self.rope(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, positions, cos, sin, cache, i)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return F.linear(hidden, weight).float()

    @torch.inference_mode()
    def teacher_forced_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [T, vocab] of one sequence run in a single forward pass."""
        ids = torch.tensor([token_ids])
        cache = KVCache(self.config, 1, len(token_ids), self.dtype)
        return self.compute_logits(self(ids, torch.arange(len(token_ids))[None], cache))[0]


# ----------------------------------------------------------------------------------- loading

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig) -> torch.dtype:
    """'auto' means the checkpoint's own dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype={dtype} is not supported; allowed: auto, {', '.join(DTYPES)}")
        return dtype
    name = config.torch_dtype if dtype == "auto" else dtype
    name = name.removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: 'auto', {', '.join(map(repr, DTYPES))}")
    return DTYPES[name]


def safetensors_files(model_dir: Path) -> list[str]:
    """The checkpoint's weight files, single-file or sharded (model.safetensors.index.json)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model={str(model_dir)!r}: no *.safetensors weights there")
    return files


def read_safetensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, single-file or sharded (model.safetensors.index.json)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    files = safetensors_files(model_dir)
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(model_dir / name)))
    return tensors


def load_model(model_dir: str | Path, dtype: str | torch.dtype = "auto") -> Transformer:
    """Build the decoder from a HF checkpoint dir; every expected tensor must be present once."""
    config = ModelConfig.from_pretrained(model_dir)
    torch_dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = Transformer(config)
    tensors = read_safetensors(model_dir)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # some writers store the tied copy too
    expected = set(model.state_dict())
    missing, unexpected = expected - tensors.keys(), tensors.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {str(model_dir)!r} does not match the {config.model_type} layout: "
            f"missing={sorted(missing)[:5]} unexpected={sorted(unexpected)[:5]}"
        )
    for name, param in model.state_dict().items():
        if tensors[name].shape != param.shape:
            raise ValueError(f"tensor {name}: shape {tuple(tensors[name].shape)} != expected {tuple(param.shape)}")
    model.load_state_dict({k: v.to(torch_dtype) for k, v in tensors.items()}, assign=True)
    model.rope = Rope(config)  # buffers are not in the checkpoint; rebuild off the meta device
    return model.requires_grad_(False).eval()
