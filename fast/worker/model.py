"""The decoder over a flattened batch with paged KV: what `fast` runs each step.

Same families and math as `ref/model.py`, rearranged for speed: tokens of all scheduled
sequences are one [num_tokens, hidden] matrix (no padding), q/k/v are one fused GEMM and
gate/up another, RoPE reads a precomputed cos/sin table, and attention goes through a paged
backend (`fast/attention`). Weights are read from the same HF checkpoints as the oracle's.

Tensor parallelism (`fast/worker/parallel.py`): with a `ParallelContext` of world size W each
rank holds num_attention_heads / W query heads, its kv heads (num_key_value_heads / W, or the
one kv head its query heads read when W > num_key_value_heads), intermediate_size / W of the
MLP and ceil(vocab_size / W) rows of the embedding and lm_head; it reads only that shard from
the checkpoint. Its KV cache holds its own kv heads: size it with `num_kv_heads`, `head_dim`,
`kv_cache_shape` / `kv_bytes_per_block`. At world size 1 (parallel None) nothing is split and
no collective runs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F

from fast.attention import AttentionBackend, AttentionMetadata
from fast.worker.parallel import (
    MergedColumnParallelLinear,
    ParallelContext,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    divide,
    replicated_weight_loader,
    shard_heads,
)
from ref.config import ModelConfig, rope_inv_freq
from ref.model import resolve_dtype, safetensors_files


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


def check_tensor_parallel(config: ModelConfig, world_size: int) -> None:
    """ValueError (naming the field and both sizes) unless `config` splits over `world_size` ranks.

    Needs: num_attention_heads and intermediate_size divisible by world_size; num_key_value_heads
    divisible by it, or dividing it (kv heads replicated). vocab_size is padded, never refused.
    """
    ctx = ParallelContext(0, world_size)
    shard_heads(config.num_attention_heads, config.num_key_value_heads, ctx)
    divide(config.intermediate_size, world_size, "intermediate_size")


def _norm_weight(size: int, dtype, device) -> nn.Parameter:
    param = nn.Parameter(torch.empty(size, dtype=dtype, device=device), requires_grad=False)
    param.weight_loader = replicated_weight_loader
    return param


class FusedLayer(nn.Module):
    """One decoder layer (this rank's shard) with fused q/k/v and gate/up projections."""

    def __init__(self, config: ModelConfig, parallel: ParallelContext, dtype: torch.dtype, device=None):
        super().__init__()
        hid, d = config.hidden_size, config.head_dim
        self.qkv = QKVParallelLinear(hid, d, config.num_attention_heads, config.num_key_value_heads,
                                     config.attention_bias, parallel, dtype, device)
        self.o_proj = RowParallelLinear(config.num_attention_heads * d, hid, config.o_proj_bias, parallel,
                                        dtype, device, field="num_attention_heads * head_dim")
        self.gate_up = MergedColumnParallelLinear(hid, [config.intermediate_size] * 2, config.mlp_bias, parallel,
                                                  dtype, device, fields=["intermediate_size"] * 2)
        self.down_proj = RowParallelLinear(config.intermediate_size, hid, config.mlp_bias, parallel,
                                           dtype, device, field="intermediate_size")
        self.input_norm = _norm_weight(hid, dtype, device)
        self.post_norm = _norm_weight(hid, dtype, device)
        self.q_norm = _norm_weight(d, dtype, device) if config.qk_norm else None
        self.k_norm = _norm_weight(d, dtype, device) if config.qk_norm else None
        self.num_heads = self.qkv.heads.num_heads  # this rank's
        self.num_kv_heads = self.qkv.heads.num_kv_heads
        self.q_size = self.num_heads * d
        self.kv_size = self.num_kv_heads * d
        self.inter = self.gate_up.parts[0].size

    def checkpoint_targets(self, prefix: str) -> dict[str, tuple[nn.Parameter, tuple]]:
        """HF checkpoint name -> (parameter, extra weight_loader args)."""
        attn, mlp = prefix + "self_attn.", prefix + "mlp."
        targets = {
            prefix + "input_layernorm.weight": (self.input_norm, ()),
            prefix + "post_attention_layernorm.weight": (self.post_norm, ()),
            attn + "o_proj.weight": (self.o_proj.weight, ()),
            mlp + "down_proj.weight": (self.down_proj.weight, ()),
        }
        for kind in ("weight", "bias"):
            for shard_id, name in enumerate(("q_proj", "k_proj", "v_proj")):
                if getattr(self.qkv, kind) is not None:
                    targets[f"{attn}{name}.{kind}"] = (getattr(self.qkv, kind), (shard_id,))
            for shard_id, name in enumerate(("gate_proj", "up_proj")):
                if getattr(self.gate_up, kind) is not None:
                    targets[f"{mlp}{name}.{kind}"] = (getattr(self.gate_up, kind), (shard_id,))
        if self.o_proj.bias is not None:
            targets[attn + "o_proj.bias"] = (self.o_proj.bias, ())
        if self.down_proj.bias is not None:
            targets[mlp + "down_proj.bias"] = (self.down_proj.bias, ())
        if self.q_norm is not None:
            targets[attn + "q_norm.weight"] = (self.q_norm, ())
            targets[attn + "k_norm.weight"] = (self.k_norm, ())
        return targets


class PagedDecoder(nn.Module):
    """forward(input_ids [N], positions [N], ...) -> hidden [N, hidden]; K/V go to the paged cache.

    Built empty (this rank's shapes) by the constructor; `from_pretrained` fills it from a checkpoint.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 parallel: ParallelContext | None = None, device: torch.device | str | None = None):
        super().__init__()
        parallel = parallel or ParallelContext.single()
        check_tensor_parallel(config, parallel.world_size)
        self.config = config
        self.parallel = parallel
        self.embed = VocabParallelEmbedding(config.vocab_size, config.hidden_size, parallel, dtype, device)
        self.layers = nn.ModuleList(FusedLayer(config, parallel, dtype, device)
                                    for _ in range(config.num_hidden_layers))
        self.final_norm = _norm_weight(config.hidden_size, dtype, device)
        self.logits_head = ParallelLMHead(config.vocab_size, config.hidden_size, parallel, dtype, device,
                                          tie_to=self.embed if config.tie_word_embeddings else None)
        self.scale = config.head_dim ** -0.5
        self.eps = config.rms_norm_eps
        freqs = torch.arange(config.max_position_embeddings).float()[:, None] * rope_inv_freq(config)
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_pos, D]
        self.register_buffer("cos", emb.cos().to(dtype).to(device), persistent=False)
        self.register_buffer("sin", emb.sin().to(dtype).to(device), persistent=False)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: str | torch.dtype = "auto",
                        parallel: ParallelContext | None = None,
                        device: torch.device | str | None = None) -> "PagedDecoder":
        """This rank's shard of the checkpoint in `model_dir` (every rank of `parallel` calls it;
        no communication). Reads tensor by tensor, and of each tensor only this rank's part."""
        config = ModelConfig.from_pretrained(model_dir)
        model = cls(config, resolve_dtype(dtype, config), parallel, device)
        model.load_checkpoint(model_dir)
        return model.eval()

    def checkpoint_targets(self) -> dict[str, tuple[nn.Parameter, tuple]]:
        """HF checkpoint name -> (parameter, extra weight_loader args), for every tensor to load."""
        targets = {"model.embed_tokens.weight": (self.embed.weight, ()),
                   "model.norm.weight": (self.final_norm, ())}
        if not self.config.tie_word_embeddings:
            targets["lm_head.weight"] = (self.logits_head.weight, ())
        for i, layer in enumerate(self.layers):
            targets.update(layer.checkpoint_targets(f"model.layers.{i}."))
        return targets

    def load_checkpoint(self, model_dir: str | Path) -> None:
        """Fill every parameter from the checkpoint's safetensors, each through its weight_loader.

        The checkpoint must hold exactly the tensors of `checkpoint_targets` (the oracle's names),
        each of its full shape (as `ref.model.load_model` checks them); each tensor is opened as a
        slice, so only this rank's rows or columns are read.
        """
        model_dir = Path(model_dir)
        targets = self.checkpoint_targets()
        found: dict[str, str] = {}  # name -> file
        for file in safetensors_files(model_dir):
            with safe_open(str(model_dir / file), framework="pt") as f:
                for name in f.keys():
                    if name == "lm_head.weight" and self.config.tie_word_embeddings:
                        continue  # some writers store the tied copy too
                    if name in found:
                        raise ValueError(f"checkpoint {str(model_dir)!r}: tensor {name} is in both "
                                         f"{found[name]} and {file}")
                    found[name] = file
        missing, unexpected = targets.keys() - found.keys(), found.keys() - targets.keys()
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {str(model_dir)!r} does not match the {self.config.model_type} layout: "
                f"missing={sorted(missing)[:5]} unexpected={sorted(unexpected)[:5]}"
            )
        for file in sorted(set(found.values())):
            with safe_open(str(model_dir / file), framework="pt") as f:
                for name in f.keys():
                    if found.get(name) == file:
                        param, args = targets[name]
                        try:
                            param.weight_loader(param, f.get_slice(name), *args)
                        except ValueError as e:
                            raise ValueError(f"tensor {name}: {e}") from None

    def prepack_weights(self) -> int:
        """Prepack every linear weight for the CPU GEMM (`fast/worker/linear_kernel.py`) where
        this machine can; the dense copies are released (see `PrepackedLinearMixin`). Call once,
        after loading; returns how many weights were packed (0 on CUDA or without oneDNN)."""
        layers = [lin for layer in self.layers for lin in (layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj)]
        return sum(lin.prepack_weight() for lin in [*layers, self.logits_head])

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def lm_head(self) -> torch.Tensor:
        """This rank's lm_head weight [ceil(vocab / W), hidden] (the whole one at world size 1);
        after `prepack_weights` an empty placeholder unless tied to the embedding."""
        return self.logits_head.weight

    @property
    def num_heads(self) -> int:
        """Query heads on this rank."""
        return self.layers[0].num_heads

    @property
    def num_kv_heads(self) -> int:
        """KV heads on this rank: the third dim of its KV cache."""
        return self.layers[0].num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, int, int, int]:
        """Shape of one layer's K (and of its V) cache on this rank."""
        return (num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes of K and V of every layer for one block of `block_size` tokens, on this rank."""
        per_token = 2 * self.config.num_hidden_layers * self.num_kv_heads * self.head_dim
        return per_token * block_size * self.dtype.itemsize

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        slot_mapping: torch.Tensor,
        metadata: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        d = self.config.head_dim
        n = input_ids.shape[0]
        x = self.embed(input_ids)  # [N, hidden]
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]  # [N, 1, D]
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            h = rms_norm(x, layer.input_norm, self.eps)
            qkv = layer.qkv(h)  # [N, q_size + 2 * kv_size] (this rank's heads)
            q = qkv[:, : layer.q_size].view(n, layer.num_heads, d)
            k = qkv[:, layer.q_size: layer.q_size + layer.kv_size].view(n, layer.num_kv_heads, d)
            v = qkv[:, layer.q_size + layer.kv_size:].view(n, layer.num_kv_heads, d)
            if layer.q_norm is not None:
                q, k = rms_norm(q, layer.q_norm, self.eps), rms_norm(k, layer.k_norm, self.eps)
            q = q * cos + rotate_half(q) * sin  # [N, Hq, D]
            k = k * cos + rotate_half(k) * sin  # [N, Hkv, D]
            backend.store_kv(k, v.contiguous(), k_cache, v_cache, slot_mapping)
            attn = backend.forward(q, k_cache, v_cache, metadata, self.scale)  # [N, Hq, D]
            x = x + layer.o_proj(attn.reshape(n, layer.q_size))  # all-reduced over ranks
            h = rms_norm(x, layer.post_norm, self.eps)
            gate_up = layer.gate_up(h)  # [N, 2 * inter]
            # A new contiguous tensor, not an in-place view: the packed GEMM copies strided inputs.
            act = F.silu(gate_up[:, : layer.inter]).mul_(gate_up[:, layer.inter:])
            x = x + layer.down_proj(act)  # all-reduced over ranks
        return rms_norm(x, self.final_norm, self.eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden] -> fp32 logits [S, vocab] (gathered: every rank gets the full vocab)."""
        return self.logits_head(hidden).float()

    @torch.inference_mode()
    def teacher_forced_logits(self, token_ids: list[int], backend: AttentionBackend,
                              block_size: int = 16) -> torch.Tensor:
        """Logits [T, vocab] of one sequence in one paged forward over a scratch cache."""
        device = self.cos.device
        num_blocks = -(-len(token_ids) // block_size)
        shape = self.kv_cache_shape(num_blocks, block_size)
        caches = [(torch.zeros(shape, dtype=self.dtype, device=device),
                   torch.zeros(shape, dtype=self.dtype, device=device)) for _ in self.layers]
        n = len(token_ids)
        metadata = AttentionMetadata.from_lists([n], [n], [list(range(num_blocks))], block_size, device)
        positions = torch.arange(n, device=device)
        ids = torch.tensor(token_ids, device=device)
        return self.compute_logits(self(ids, positions, caches, positions, metadata, backend))
