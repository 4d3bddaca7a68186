"""The decoder over a flattened batch with paged KV: what `fast` runs each step.

Same families and math as `ref/model.py`, rearranged for speed: tokens of all scheduled
sequences are one [num_tokens, hidden] matrix (no padding), q/k/v are one fused GEMM and
gate/up another, RoPE reads a precomputed cos/sin table, and attention goes through a paged
backend (`fast/attention`). Weights come from the same checkpoint loader as the oracle.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fast.attention import AttentionBackend, AttentionMetadata
from ref.config import ModelConfig, rope_inv_freq
from ref.model import Transformer, load_model


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As the oracle: statistics in fp32, scale in the model dtype (fp32: torch's fused kernel)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class FusedLayer(nn.Module):
    """One decoder layer with fused q/k/v and gate/up projections."""

    def __init__(self, src, config: ModelConfig):
        super().__init__()
        attn, mlp = src.self_attn, src.mlp
        self.qkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj
        self.gate_up = _fuse([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj
        self.input_norm = src.input_layernorm.weight
        self.post_norm = src.post_attention_layernorm.weight
        self.q_norm = attn.q_norm.weight if config.qk_norm else None
        self.k_norm = attn.k_norm.weight if config.qk_norm else None
        self.q_size = config.num_attention_heads * config.head_dim
        self.kv_size = config.num_key_value_heads * config.head_dim
        self.inter = config.intermediate_size


def _fuse(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the concatenation of `linears`' outputs."""
    weight = torch.cat([lin.weight for lin in linears], dim=0)
    has_bias = [lin.bias is not None for lin in linears]
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=any(has_bias), device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if any(has_bias):
        bias = torch.cat([lin.bias if lin.bias is not None else torch.zeros(lin.out_features, dtype=weight.dtype)
                          for lin in linears])
        fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused


class PagedDecoder(nn.Module):
    """forward(input_ids [N], positions [N], ...) -> hidden [N, hidden]; K/V go to the paged cache."""

    def __init__(self, ref_model: Transformer):
        super().__init__()
        config = ref_model.config
        self.config = config
        self.embed = ref_model.model.embed_tokens
        self.layers = nn.ModuleList(FusedLayer(layer, config) for layer in ref_model.model.layers)
        self.final_norm = ref_model.model.norm.weight
        self.lm_head = self.embed.weight if config.tie_word_embeddings else ref_model.lm_head.weight
        self.scale = config.head_dim ** -0.5
        self.eps = config.rms_norm_eps
        freqs = torch.arange(config.max_position_embeddings).float()[:, None] * rope_inv_freq(config)
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_pos, D]
        dtype = self.embed.weight.dtype
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin", emb.sin().to(dtype), persistent=False)

    @classmethod
    def from_pretrained(cls, model_dir: str, dtype: str | torch.dtype = "auto") -> "PagedDecoder":
        return cls(load_model(model_dir, dtype)).eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        slot_mapping: torch.Tensor,
        metadata: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        cfg = self.config
        n = input_ids.shape[0]
        x = self.embed(input_ids)  # [N, hidden]
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]  # [N, 1, D]
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            h = rms_norm(x, layer.input_norm, self.eps)
            qkv = layer.qkv(h)  # [N, q_size + 2 * kv_size]
            q = qkv[:, : layer.q_size].view(n, cfg.num_attention_heads, cfg.head_dim)
            k = qkv[:, layer.q_size: layer.q_size + layer.kv_size].view(n, cfg.num_key_value_heads, cfg.head_dim)
            v = qkv[:, layer.q_size + layer.kv_size:].view(n, cfg.num_key_value_heads, cfg.head_dim)
            if layer.q_norm is not None:
                q, k = rms_norm(q, layer.q_norm, self.eps), rms_norm(k, layer.k_norm, self.eps)
            q = q * cos + rotate_half(q) * sin  # [N, Hq, D]
            k = k * cos + rotate_half(k) * sin  # [N, Hkv, D]
            backend.store_kv(k, v.contiguous(), k_cache, v_cache, slot_mapping)
            attn = backend.forward(q, k_cache, v_cache, metadata, self.scale)  # [N, Hq, D]
            x = x + layer.o_proj(attn.reshape(n, layer.q_size))
            h = rms_norm(x, layer.post_norm, self.eps)
            gate_up = layer.gate_up(h)  # [N, 2 * inter]
            act = F.silu(gate_up[:, : layer.inter], inplace=True).mul_(gate_up[:, layer.inter:])
            x = x + layer.down_proj(act)
        return rms_norm(x, self.final_norm, self.eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden] -> fp32 logits [S, vocab]."""
        return F.linear(hidden, self.lm_head).float()

    @torch.inference_mode()
    def teacher_forced_logits(self, token_ids: list[int], backend: AttentionBackend,
                              block_size: int = 16) -> torch.Tensor:
        """Logits [T, vocab] of one sequence in one paged forward over a scratch cache."""
        cfg, device = self.config, self.cos.device
        num_blocks = -(-len(token_ids) // block_size)
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        caches = [(torch.zeros(shape, dtype=self.dtype, device=device),
                   torch.zeros(shape, dtype=self.dtype, device=device)) for _ in self.layers]
        n = len(token_ids)
        metadata = AttentionMetadata.from_lists([n], [n], [list(range(num_blocks))], block_size, device)
        positions = torch.arange(n, device=device)
        ids = torch.tensor(token_ids, device=device)
        return self.compute_logits(self(ids, positions, caches, positions, metadata, backend))
