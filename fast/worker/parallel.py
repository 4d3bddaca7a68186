"""Tensor parallelism, Megatron style, on torch.distributed: the context and the sharded layers.

A `ParallelContext` (rank, world size, process group) is passed explicitly to whatever needs it;
there is no module-global state. At world_size 1 every collective is a no-op, torch.distributed
is never touched, and every layer computes exactly what a plain `nn.Linear` / `nn.Embedding`
would (same call, same numbers).

How one decoder layer is split over W ranks (x is replicated on every rank):

    qkv      QKVParallelLinear          rank r: its q heads, its k heads, its v heads (one GEMM)
    o_proj   RowParallelLinear          input (q heads * head_dim) split; all-reduce; bias once
    gate_up  MergedColumnParallelLinear rank r: its slice of gate and its slice of up
    down     RowParallelLinear          input (intermediate) split; all-reduce; bias once

Embedding and lm_head split the vocabulary (`VocabParallelEmbedding`, `ParallelLMHead`). The
vocabulary is PADDED, not split unevenly: every rank holds ceil(vocab / W) rows, the last rank's
rows past `vocab_size` are zeros that no token id reaches, and the gathered logits are cut back
to `vocab_size` columns. Equal shards keep the all-gather a plain equal-size collective.

Every parameter carries `param.weight_loader(param, full, *shard_id)`: `full` is the whole
checkpoint tensor or a safetensors slice (`safe_open(...).get_slice(name)`); the loader reads
only this rank's rows/columns of it (with a slice, only those bytes leave the file) and copies
them into `param`, converting to the parameter's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fast.worker import linear_kernel


@dataclass(frozen=True)
class ParallelContext:
    """Which tensor-parallel rank this process is. `group` None with world_size > 1 means the
    default (world) process group; at world_size 1 torch.distributed is never used."""

    rank: int = 0
    world_size: int = 1
    group: Any = None  # torch.distributed.ProcessGroup | None

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} is not in [0, world_size={self.world_size})")

    @classmethod
    def single(cls) -> "ParallelContext":
        return cls(0, 1, None)

    @classmethod
    def from_group(cls, group=None) -> "ParallelContext":
        """This process's rank in `group` (None: the default group) of an initialized torch.distributed."""
        import torch.distributed as dist

        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    @classmethod
    def init(cls, rank: int, world_size: int, init_method: str | None = None, backend: str = "gloo",
             timeout: timedelta | None = None) -> "ParallelContext":
        """Join the default process group as `rank` of `world_size` (e.g. init_method
        "tcp://127.0.0.1:PORT"; backend "nccl" for CUDA, "gloo" for CPU) and return this rank's
        context. World size 1 joins nothing: `single()`."""
        if world_size == 1:
            return cls.single()
        import torch.distributed as dist

        cls(rank, world_size)  # check the rank before anyone waits for it
        kwargs = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, **kwargs)
        return cls(rank, world_size, None)

    def destroy(self) -> None:
        """Leave the process group (`group` None: the default group, i.e. torch.distributed
        entirely). A no-op at world size 1 or when already gone."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group(self.group)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks, in place (x must be contiguous); returns x."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's `x` (all the same shape) concatenated along `dim` in rank order, on every rank."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def gather_to_first(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """As `all_gather`, but only rank 0 receives the concatenation; the others get None."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.is_first else None
        dist.gather(x, parts, group=self.group, group_dst=0)
        return torch.cat(parts, dim=dim) if self.is_first else None


# ------------------------------------------------------------------------------ split rules


def divide(size: int, world_size: int, field: str) -> int:
    """size / world_size, or a ValueError naming the field when it does not split evenly."""
    if size % world_size:
        raise ValueError(
            f"{field}={size} is not divisible by the tensor parallel size {world_size}"
        )
    return size // world_size


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one rank holds: q heads [q_start, q_start + num_heads), kv heads
    [kv_start, kv_start + num_kv_heads). KV heads are split when world_size divides
    num_key_value_heads, else replicated: each rank holds the one kv head its q heads read
    (world_size / num_key_value_heads ranks hold a copy of each)."""

    num_heads: int
    q_start: int
    num_kv_heads: int
    kv_start: int
    kv_replicas: int  # how many ranks hold each kv head (1: no replication)


def shard_heads(num_heads: int, num_kv_heads: int, parallel: ParallelContext) -> HeadShard:
    ws, rank = parallel.world_size, parallel.rank
    heads = divide(num_heads, ws, "num_attention_heads")
    if num_kv_heads % ws == 0:
        kv = num_kv_heads // ws
        return HeadShard(heads, rank * heads, kv, rank * kv, 1)
    if ws % num_kv_heads:
        raise ValueError(
            f"num_key_value_heads={num_kv_heads} and the tensor parallel size {ws}: one must divide "
            f"the other (fewer kv heads than ranks are replicated, which needs {ws} % {num_kv_heads} == 0)"
        )
    replicas = ws // num_kv_heads
    # Rank r's q heads all read kv head (r * heads) // (num_heads / num_kv_heads) = r // replicas.
    return HeadShard(heads, rank * heads, 1, rank // replicas, replicas)


# ------------------------------------------------------------------------------ weight sources


def source_shape(src) -> tuple[int, ...]:
    """Shape of a tensor or of a safetensors slice."""
    return tuple(src.shape) if isinstance(src, torch.Tensor) else tuple(src.get_shape())


def read_rows(src, dim: int, start: int, length: int) -> torch.Tensor:
    """src[..., start:start+length, ...] along `dim`; a safetensors slice reads only those bytes."""
    return src[(slice(None),) * dim + (slice(start, start + length),)]


def _check_full(param: nn.Parameter, src, expected: tuple[int, ...]) -> None:
    if source_shape(src) != expected:
        raise ValueError(f"shape {source_shape(src)} != expected {expected}")


def replicated_weight_loader(param: nn.Parameter, full) -> None:
    """Every rank holds the whole tensor (norm weights, row-parallel biases)."""
    _check_full(param, full, tuple(param.shape))
    with torch.no_grad():
        param.copy_(read_rows(full, 0, 0, param.shape[0]))


def _parameter(shape: tuple[int, ...], dtype, device, loader) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    param.weight_loader = loader
    return param


# ------------------------------------------------------------------------------ linear layers


class PrepackedLinearMixin:
    """A layer whose weight can be prepacked for the CPU GEMM (`fast/worker/linear_kernel.py`).

    `prepack_weight()` runs once, after loading: the packed copy serves every forward, and
    `release_dense` (the default) drops the dense weight's storage, leaving `weight` as an empty
    [0] placeholder so the weights are not held twice. Before it (or where packing is not
    possible) the layer runs `F.linear` on the dense weight."""

    packed_weight: torch.Tensor | None = None

    def prepack_weight(self, release_dense: bool = True) -> bool:
        """Pack the weight if this machine can; True when packed."""
        if self.packed_weight is not None:
            return True
        if not linear_kernel.can_prepack(self.weight):
            return False
        self.packed_weight = linear_kernel.prepack(self.weight)
        if release_dense:
            self.weight.data = self.weight.data.new_empty(0)
        return True

    def _gemm(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return linear_kernel.linear(x, self.weight, self.packed_weight, bias)



@dataclass(frozen=True)
class _Part:
    """One projection inside a merged layer: rows [start, start + size) of its full output."""

    full_size: int
    start: int
    size: int


class MergedColumnParallelLinear(PrepackedLinearMixin, nn.Module):
    """Several projections of the same input in one GEMM, each split along its output dim.

    The local output is [this rank's slice of part 0 | of part 1 | ...] (not a slice of the
    concatenation). `weight_loader(param, full, shard_id)` loads part `shard_id`.
    """

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool,
                 parallel: ParallelContext, dtype: torch.dtype | None = None, device=None,
                 fields: Sequence[str] | None = None):
        fields = fields or [f"output_sizes[{i}]" for i in range(len(output_sizes))]
        parts = []
        for full, field in zip(output_sizes, fields):
            size = divide(full, parallel.world_size, field)
            parts.append(_Part(full, parallel.rank * size, size))
        self._init(in_features, parts, bias, parallel, dtype, device)

    def _init(self, in_features: int, parts: list[_Part], bias: bool, parallel: ParallelContext,
              dtype, device) -> None:
        super().__init__()
        self.parallel = parallel
        self.parts = parts
        self.offsets = [sum(p.size for p in parts[:i]) for i in range(len(parts))]  # in the local output
        self.in_features = in_features
        self.out_features = sum(p.size for p in parts)  # this rank's
        self.weight = _parameter((self.out_features, in_features), dtype, device, self.weight_loader)
        self.bias = _parameter((self.out_features,), dtype, device, self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, full, shard_id: int) -> None:
        part = self.parts[shard_id]
        _check_full(param, full, (part.full_size, *param.shape[1:]))
        with torch.no_grad():
            param.narrow(0, self.offsets[shard_id], part.size).copy_(read_rows(full, 0, part.start, part.size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._gemm(x, self.bias)


class ColumnParallelLinear(MergedColumnParallelLinear):
    """y_local = x W_r^T + b_r with W's output rows split evenly; no communication.
    `weight_loader(param, full)`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, parallel: ParallelContext,
                 dtype: torch.dtype | None = None, device=None, field: str = "out_features"):
        super().__init__(in_features, [out_features], bias, parallel, dtype, device, [field])

    def weight_loader(self, param: nn.Parameter, full, shard_id: int = 0) -> None:
        super().weight_loader(param, full, shard_id)


class QKVParallelLinear(MergedColumnParallelLinear):
    """Fused q/k/v: rank r's local output is [its q heads | its k heads | its v heads] * head_dim.
    shard_id 0, 1, 2 = q, k, v. KV heads replicate when there are fewer than ranks (`shard_heads`)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 parallel: ParallelContext, dtype: torch.dtype | None = None, device=None):
        heads = shard_heads(num_heads, num_kv_heads, parallel)
        q = _Part(num_heads * head_dim, heads.q_start * head_dim, heads.num_heads * head_dim)
        kv = _Part(num_kv_heads * head_dim, heads.kv_start * head_dim, heads.num_kv_heads * head_dim)
        self._init(hidden_size, [q, kv, kv], bias, parallel, dtype, device)
        self.heads = heads


class RowParallelLinear(PrepackedLinearMixin, nn.Module):
    """y = sum over ranks of x_r W_r^T, + b once: W's input columns split evenly, x arrives split
    the same way (the output of a column-parallel layer), the partial sums are all-reduced and
    the (replicated) bias is added after the reduction. `weight_loader(param, full)`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, parallel: ParallelContext,
                 dtype: torch.dtype | None = None, device=None, field: str = "in_features"):
        super().__init__()
        self.parallel = parallel
        self.in_features = divide(in_features, parallel.world_size, field)  # this rank's
        self.full_in_features = in_features
        self.out_features = out_features
        self.weight = _parameter((out_features, self.in_features), dtype, device, self.weight_loader)
        self.bias = _parameter((out_features,), dtype, device, replicated_weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, full) -> None:
        _check_full(param, full, (self.out_features, self.full_in_features))
        start = self.parallel.rank * self.in_features
        with torch.no_grad():
            param.copy_(read_rows(full, 1, start, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel.world_size == 1:
            return self._gemm(x, self.bias)
        y = self.parallel.all_reduce(self._gemm(x, None))
        return y if self.bias is None else y.add_(self.bias)


# ------------------------------------------------------------------------------ vocabulary


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split: rank r holds rows [r * P, (r + 1) * P) with
    P = ceil(vocab / W) (rows past vocab_size are zero padding). Each rank looks up the ids it
    holds, zeros the others, and the all-reduce sums the one non-zero row per token."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelContext,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.parallel = parallel
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.rows = -(-vocab_size // parallel.world_size)  # per rank, padding included
        self.start = parallel.rank * self.rows
        self.valid_rows = max(0, min(self.rows, vocab_size - self.start))  # real tokens held
        self.weight = _parameter((self.rows, hidden_size), dtype, device, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, full) -> None:
        _check_full(param, full, (self.vocab_size, self.hidden_size))
        with torch.no_grad():
            param[self.valid_rows:].zero_()
            if self.valid_rows:
                param[: self.valid_rows].copy_(read_rows(full, 0, self.start, self.valid_rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        held = (local >= 0) & (local < self.valid_rows)
        out = F.embedding(torch.where(held, local, 0), self.weight)
        out.mul_(held.unsqueeze(-1).to(out.dtype))
        return self.parallel.all_reduce(out)


class ParallelLMHead(PrepackedLinearMixin, VocabParallelEmbedding):
    """Output projection with the vocabulary split as in `VocabParallelEmbedding`: each rank
    computes its [S, P] block of logits; they are all-gathered and cut to [S, vocab_size] (every
    rank gets the full logits). `tie_to` shares an embedding's (identically split) weight."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelContext,
                 dtype: torch.dtype | None = None, device=None, tie_to: VocabParallelEmbedding | None = None):
        super().__init__(vocab_size, hidden_size, parallel, dtype, device="meta" if tie_to else device)
        self.tied = tie_to is not None
        if tie_to is not None:
            self.weight = tie_to.weight

    def prepack_weight(self, release_dense: bool = True) -> bool:
        """As for the linear layers; a weight tied to the embedding stays dense (the lookup reads it)."""
        return super().prepack_weight(release_dense and not self.tied)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._gemm(hidden, None)  # [S, P]
        if self.parallel.world_size == 1:
            return logits
        return self.parallel.all_gather(logits, dim=-1)[..., : self.vocab_size]
