"""Tensor parallelism of the fast model: sharded ranks (gloo on CPU) compute the unsharded logits.

Each spawned rank loads its shard of a tiny checkpoint of every family and runs two paged steps
over a flattened batch of 2 sequences (prefills, then a decode beside a chunk over cached
context); its gathered logits must equal the single-process model's within the fp32 logit
tolerance. Loading needs no communication, so shard sizes, what a rank reads from the
checkpoint, and the refusals of unsplittable configs are checked in this process.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing.connection
import os
import select
import socket
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from conformance.compare import LOGIT_ATOL, assert_close
from fast.attention import AttentionMetadata, get_backend
from fast.worker import model as model_module
from fast.worker.model import PagedDecoder, check_tensor_parallel
from fast.worker.parallel import ParallelContext
from ref.config import ModelConfig
from ref.model import load_model
from ref.models import tiny_checkpoint

# name -> (family, overrides of the tiny config: 4 q heads, 2 kv heads, vocab 512, inter 128)
CASES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),  # q/k/v biases
    "qwen3": ("qwen3", {}),  # q/k norms
    # One kv head over 2 ranks: each rank holds a copy (MQA), with the family's other switches.
    "llama-mqa-tied-vocab509": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True, vocab_size=509)),
    "mistral-mqa": ("mistral", dict(num_key_value_heads=1)),
    "qwen2-mqa": ("qwen2", dict(num_key_value_heads=1)),
    "qwen3-mqa-bias": ("qwen3", dict(num_key_value_heads=1, attention_bias=True)),  # o_proj bias: added once
    "llama-all-biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
}
RANK_TIMEOUT_S = 120
BLOCK_SIZE = 4
NUM_BLOCKS = 6
# Two sequences in one flattened batch; step 1 prefills both, step 2 decodes A beside a chunk of B
# over its cached context. Blocks are scattered so the block tables matter.
TOKENS = {"A": [5, 77, 301, 12, 9, 480, 33, 250, 101, 7], "B": [400, 3, 58, 211, 64, 19, 300, 222, 45]}
TABLES = {"A": [5, 1, 3], "B": [0, 4, 2]}
STEPS = [[("A", 0, 9), ("B", 0, 6)], [("A", 9, 10), ("B", 6, 9)]]


@torch.inference_mode()
def paged_logits(model: PagedDecoder) -> torch.Tensor:
    """fp32 logits [rows of both steps, vocab] of the two-step paged workload above."""
    backend = get_backend("torch", "cpu")
    shape = model.kv_cache_shape(NUM_BLOCKS, BLOCK_SIZE)
    caches = [(torch.zeros(shape, dtype=model.dtype), torch.zeros(shape, dtype=model.dtype))
              for _ in range(model.config.num_hidden_layers)]
    out = []
    for step in STEPS:
        ids, positions, slots, query_lens, seq_lens, tables = [], [], [], [], [], []
        for seq, start, end in step:
            table = TABLES[seq]
            ids += TOKENS[seq][start:end]
            positions += range(start, end)
            slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)]
            query_lens.append(end - start)
            seq_lens.append(end)
            tables.append(table)
        metadata = AttentionMetadata.from_lists(query_lens, seq_lens, tables, BLOCK_SIZE, "cpu")
        as_tensor = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
        hidden = model(as_tensor(ids), as_tensor(positions), caches, as_tensor(slots), metadata, backend)
        out.append(model.compute_logits(hidden))
    return torch.cat(out)


# ------------------------------------------------------------------------------ spawned ranks


def _exit_with(test_pid: int) -> None:
    """End this rank as soon as the test process is gone, however it ends: a rank blocked in a
    collective would otherwise wait out the gloo timeout. (Ranks are children of the fork server,
    which lives as long as they do, so PR_SET_PDEATHSIG would not fire.)"""

    def watch() -> None:
        try:
            fd = os.pidfd_open(test_pid)  # readable once the process has exited
            select.select([fd], [], [])
        except (AttributeError, OSError):  # no pidfd here, or the test process is already gone
            while True:
                try:
                    os.kill(test_pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _rank_main(rank: int, world_size: int, port: int, dirs: dict[str, str], out_dir: str, test_pid: int,
               fail_rank: int | None) -> None:
    _exit_with(test_pid)
    out = Path(out_dir)
    try:
        torch.set_num_threads(1)
        parallel = ParallelContext.init(rank, world_size, f"tcp://127.0.0.1:{port}", "gloo",
                                        timeout=timedelta(seconds=RANK_TIMEOUT_S))
        assert parallel == ParallelContext.from_group()
        if rank == fail_rank:
            raise RuntimeError("planted failure")
        results = {}
        for name, model_dir in dirs.items():
            model = PagedDecoder.from_pretrained(model_dir, parallel=parallel)
            results[name] = dict(logits=paged_logits(model), num_kv_heads=model.num_kv_heads,
                                 numel=sum(p.numel() for p in model.parameters()))
        x = torch.full((2, 3), float(rank + 1))
        results["collectives"] = dict(
            all_gather=parallel.all_gather(x, dim=0), gather_to_first=parallel.gather_to_first(x, dim=1),
            all_reduce=parallel.all_reduce(x.clone()))
        torch.save(results, out / f"rank{rank}.pt")
        parallel.destroy()
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_context():
    """Ranks fork from one server that imported torch and this module once (a spawned rank would
    import them anew: seconds each on a busy 2-core machine). Forking before any torch op is safe."""
    ctx = torch.multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def run_ranks(world_size: int, dirs: dict[str, str], out_dir: Path, fail_rank: int | None = None) -> list[dict]:
    """Run `world_size` ranks over `dirs`; each rank's results. Every rank is gone on return."""
    ctx = _rank_context()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, dirs, str(out_dir), os.getpid(), fail_rank),
                         daemon=True)
             for r in range(world_size)]
    started = []
    try:
        for p in procs:
            p.start()
            started.append(p)
        deadline = time.monotonic() + RANK_TIMEOUT_S
        pending = list(started)
        while pending and time.monotonic() < deadline:
            multiprocessing.connection.wait([p.sentinel for p in pending], timeout=deadline - time.monotonic())
            pending = [p for p in pending if p.exitcode is None]
            if any(p.exitcode for p in started):
                break  # a rank failed: the others would wait for it in a collective
    finally:
        for p in started:
            if p.is_alive():
                p.kill()
        for p in started:
            p.join(timeout=10)
    errors = [f"rank {r}:\n{(out_dir / f'rank{r}.err').read_text()}" for r in range(world_size)
              if (out_dir / f"rank{r}.err").is_file()]
    codes = [p.exitcode for p in procs]
    if errors or any(codes):
        pytest.fail(f"ranks exited with {codes} (killed after {RANK_TIMEOUT_S}s if still running)\n"
                    + "\n".join(errors))
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]


@pytest.fixture(scope="module")
def checkpoints() -> dict[str, str]:
    return {name: str(tiny_checkpoint(family, **overrides)) for name, (family, overrides) in CASES.items()}


@pytest.fixture(scope="module")
def unsharded(checkpoints) -> dict[str, torch.Tensor]:
    return {name: paged_logits(PagedDecoder.from_pretrained(d)) for name, d in checkpoints.items()}


@pytest.fixture(scope="module")
def tp2(checkpoints, tmp_path_factory) -> list[dict]:
    return run_ranks(2, checkpoints, tmp_path_factory.mktemp("tp2"))


@pytest.mark.parametrize("name", CASES)
def test_tp2_logits_equal_unsharded(name, checkpoints, unsharded, tp2):
    config = ModelConfig.from_pretrained(checkpoints[name])
    for rank, results in enumerate(tp2):
        got = results[name]
        assert got["num_kv_heads"] == max(1, config.num_key_value_heads // 2)
        assert got["numel"] == expected_rank_numel(config, 2)
        assert_close(f"{name} rank {rank} logits", got["logits"], unsharded[name], LOGIT_ATOL[torch.float32])


def test_tp2_collectives(tp2):
    for rank, results in enumerate(tp2):
        c = results["collectives"]
        assert torch.equal(c["all_gather"], torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)]))
        assert torch.equal(c["all_reduce"], torch.full((2, 3), 3.0))
        if rank == 0:
            assert torch.equal(c["gather_to_first"], torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)], 1))
        else:
            assert c["gather_to_first"] is None


def test_a_failing_rank_fails_the_test_and_no_rank_outlives_it(checkpoints, tmp_path):
    """Rank 0 raises; rank 1 then waits in its first all-reduce until it is killed (or gloo
    notices the closed connection first and it fails too)."""
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"(?s)ranks exited with \[1, (-9|1)\].*planted failure"):
        run_ranks(2, {"llama": checkpoints["llama"]}, tmp_path, fail_rank=0)
    assert time.monotonic() - started < RANK_TIMEOUT_S / 2


def test_tp4_replicates_two_kv_heads(checkpoints, unsharded, tmp_path):
    """4 ranks, 4 q heads, 2 kv heads: one q head per rank, each kv head held by 2 ranks."""
    results = run_ranks(4, {"llama": checkpoints["llama"]}, tmp_path)
    config = ModelConfig.from_pretrained(checkpoints["llama"])
    for rank, r in enumerate(results):
        assert r["llama"]["num_kv_heads"] == 1
        assert r["llama"]["numel"] == expected_rank_numel(config, 4)
        assert_close(f"tp4 rank {rank} logits", r["llama"]["logits"], unsharded["llama"], LOGIT_ATOL[torch.float32])


# ------------------------------------------------------------------------------ in this process


def expected_rank_numel(cfg: ModelConfig, ws: int) -> int:
    """Parameter elements of one rank's shard, written from the split rules (not the code)."""
    H, D, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    heads = cfg.num_attention_heads // ws
    kv = cfg.num_key_value_heads // ws if cfg.num_key_value_heads % ws == 0 else 1
    inter = cfg.intermediate_size // ws
    layer = (heads + 2 * kv) * D * H + H * heads * D + 3 * H * inter + 2 * H
    layer += (heads + 2 * kv) * D if cfg.attention_bias else 0
    layer += H if cfg.o_proj_bias else 0
    layer += 2 * inter + H if cfg.mlp_bias else 0
    layer += 2 * D if cfg.qk_norm else 0
    vocab_rows = math.ceil(cfg.vocab_size / ws)
    return L * layer + H + vocab_rows * H * (1 if cfg.tie_word_embeddings else 2)


class _CountingSlices:
    """Wraps safetensors' safe_open: counts the elements each get_slice()[...] reads."""

    def __init__(self, real):
        self.real, self.read = real, 0

    def __call__(self, *args, **kwargs):
        outer = self

        class File:
            def __enter__(self):
                self.f = outer.real(*args, **kwargs).__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_slice(self, name):
                inner = self.f.get_slice(name)

                class Slice:
                    def get_shape(self):
                        return inner.get_shape()

                    def __getitem__(self, index):
                        t = inner[index]
                        outer.read += t.numel()
                        return t

                return Slice()

        return File()


@pytest.mark.parametrize("name,ws", [("llama", 2), ("qwen3", 2), ("llama-mqa-tied-vocab509", 2),
                                     ("qwen3-mqa-bias", 2), ("llama-all-biases", 2), ("llama", 4)])
def test_each_rank_holds_and_reads_only_its_shard(name, ws, checkpoints, monkeypatch):
    """Loading is collective-free, so rank r's model loads here with a context of rank r."""
    d = checkpoints[name]
    config = ModelConfig.from_pretrained(d)
    full = load_model(d)
    full_numel = sum(t.numel() for t in full.state_dict().values())
    pad_rows = math.ceil(config.vocab_size / ws) * ws - config.vocab_size
    per_rank = []
    for rank in range(ws):
        counting = _CountingSlices(model_module.safe_open)
        monkeypatch.setattr(model_module, "safe_open", counting)
        model = PagedDecoder.from_pretrained(d, parallel=ParallelContext(rank, ws))
        numel = sum(p.numel() for p in model.parameters())
        assert numel == expected_rank_numel(config, ws) < full_numel
        padding = (pad_rows if rank == ws - 1 else 0) * config.hidden_size * (1 if config.tie_word_embeddings else 2)
        assert counting.read == numel - padding, "a rank read more of the checkpoint than its shard"
        per_rank.append(model)
        # The rank's k rows are exactly the kv head its q heads read.
        attn = full.model.layers[0].self_attn
        D, heads = config.head_dim, config.num_attention_heads // ws
        kv_head = rank * heads // config.num_queries_per_kv
        k_rows = model.layers[0].qkv.weight[heads * D: heads * D + model.num_kv_heads * D]
        assert torch.equal(k_rows[:D], attn.k_proj.weight[kv_head * D: (kv_head + 1) * D])
    # The shards tile the full tensors: q rows, gate rows, o_proj columns, vocab rows.
    layers = [m.layers[0] for m in per_rank]
    assert torch.equal(torch.cat([x.qkv.weight[: x.q_size] for x in layers]), attn.q_proj.weight)
    assert torch.equal(torch.cat([x.gate_up.weight[: x.inter] for x in layers]), full.model.layers[0].mlp.gate_proj.weight)
    assert torch.equal(torch.cat([x.o_proj.weight for x in layers], 1), attn.o_proj.weight)
    assert torch.equal(torch.cat([m.embed.weight[: m.embed.valid_rows] for m in per_rank]),
                       full.model.embed_tokens.weight)
    assert not per_rank[-1].embed.weight[per_rank[-1].embed.valid_rows:].any()  # zero padding


def test_single_rank_is_the_fused_oracle_layout(checkpoints):
    """World size 1: the weights are the oracle's, concatenated q|k|v and gate|up, unsplit."""
    d = checkpoints["llama-all-biases"]
    ref, model = load_model(d), PagedDecoder.from_pretrained(d)
    assert model.parallel == ParallelContext.single()
    for src, layer in zip(ref.model.layers, model.layers):
        a, m = src.self_attn, src.mlp
        assert torch.equal(layer.qkv.weight, torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        assert torch.equal(layer.qkv.bias, torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        assert torch.equal(layer.gate_up.weight, torch.cat([m.gate_proj.weight, m.up_proj.weight]))
        assert torch.equal(layer.o_proj.weight, a.o_proj.weight) and torch.equal(layer.down_proj.bias, m.down_proj.bias)
    assert torch.equal(model.embed.weight, ref.model.embed_tokens.weight)
    assert torch.equal(model.lm_head, ref.lm_head.weight)
    assert model.num_kv_heads == 2 and model.head_dim == 16
    assert model.kv_bytes_per_block(16) == 2 * 2 * 2 * 16 * 16 * 4
    x = torch.ones(3, 4)
    single = ParallelContext.single()
    assert single.all_reduce(x) is x and single.all_gather(x) is x and single.gather_to_first(x) is x


def _config(**changes) -> ModelConfig:
    return dataclasses.replace(ModelConfig.from_pretrained(tiny_checkpoint("llama")), **changes)


@pytest.mark.parametrize("changes,ws,message", [
    (dict(), 3, "num_attention_heads=4 is not divisible by the tensor parallel size 3"),
    (dict(num_attention_heads=6, num_key_value_heads=3), 2, "num_key_value_heads=3 and the tensor parallel size 2"),
    (dict(num_attention_heads=12, num_key_value_heads=3), 4, "num_key_value_heads=3 and the tensor parallel size 4"),
    (dict(intermediate_size=130), 4, "intermediate_size=130 is not divisible by the tensor parallel size 4"),
])
def test_unsplittable_config_is_a_value_error(changes, ws, message):
    config = _config(**changes)
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel(config, ws)
    with pytest.raises(ValueError, match=message):
        PagedDecoder(config, parallel=ParallelContext(ws - 1, ws))


def test_splittable_configs_pass():
    for ws in (1, 2, 4):
        check_tensor_parallel(_config(), ws)
    check_tensor_parallel(_config(num_attention_heads=8, num_key_value_heads=1, vocab_size=509), 8)


def test_from_pretrained_refuses_before_reading(checkpoints, monkeypatch):
    monkeypatch.setattr(model_module, "safe_open", None)  # any read would raise TypeError
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by the tensor parallel size 3"):
        PagedDecoder.from_pretrained(checkpoints["llama"], parallel=ParallelContext(0, 3))


def test_parallel_context_checks_its_rank():
    with pytest.raises(ValueError, match="rank=2"):
        ParallelContext(2, 2)
    with pytest.raises(ValueError, match="world_size"):
        ParallelContext(0, 0)


def _rewrite_checkpoint(src: str, out: Path, files: list[dict[str, torch.Tensor]]) -> Path:
    """config.json of `src` with `files` as the weights (several: with an index)."""
    from safetensors.torch import save_file

    out.mkdir()
    (out / "config.json").write_text((Path(src) / "config.json").read_text())
    weight_map = {}
    for i, tensors in enumerate(files):
        name = f"model-{i:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / name))
        weight_map.update(dict.fromkeys(tensors, name))
    if len(files) > 1:
        import json

        (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return out


def test_sharded_checkpoint_files_and_bad_checkpoints(checkpoints, tmp_path):
    from safetensors.torch import load_file

    d = checkpoints["qwen2-mqa"]
    tensors = load_file(str(Path(d) / "model.safetensors"))
    names = sorted(tensors)
    halves = [{k: tensors[k] for k in names[::2]}, {k: tensors[k] for k in names[1::2]}]
    two_files = _rewrite_checkpoint(d, tmp_path / "two", halves)
    for rank in range(2):
        a = PagedDecoder.from_pretrained(two_files, parallel=ParallelContext(rank, 2))
        b = PagedDecoder.from_pretrained(d, parallel=ParallelContext(rank, 2))
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    k = "model.layers.1.self_attn.k_proj.bias"
    bad_shape = _rewrite_checkpoint(d, tmp_path / "shape", [{**tensors, k: tensors[k][:-1]}])
    with pytest.raises(ValueError, match=rf"tensor {k}: shape \(15,\) != expected \(16,\)"):
        PagedDecoder.from_pretrained(bad_shape, parallel=ParallelContext(1, 2))
    missing = _rewrite_checkpoint(d, tmp_path / "missing", [{n: t for n, t in tensors.items() if n != k}])
    with pytest.raises(ValueError, match=rf"does not match the qwen2 layout: missing=\['{k}'\] unexpected=\[\]"):
        PagedDecoder.from_pretrained(missing)
    twice = _rewrite_checkpoint(d, tmp_path / "twice", [tensors, {k: tensors[k]}])
    with pytest.raises(ValueError, match=f"tensor {k} is in both"):
        PagedDecoder.from_pretrained(twice)
