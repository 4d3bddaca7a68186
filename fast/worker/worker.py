"""A worker: one rank of the model — its device, its shard of the weights, its KV cache and the
model runner that executes each step. With tensor parallelism there is one worker per rank (in
its own process or Ray actor); the executor sends every rank the same `SchedulerOutput`."""

from __future__ import annotations

import torch

from fast.attention import get_backend
from fast.config import ResolvedConfig
from fast.core.outputs import ModelRunnerOutput, SchedulerOutput
from fast.worker.model import PagedDecoder
from fast.worker.model_runner import ModelRunner


def resolve_device(name: str, rank: int = 0) -> torch.device:
    """"auto": cuda when available (rank r on cuda:r), else cpu."""
    if name == "auto":
        return torch.device(f"cuda:{rank}" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        return torch.device(f"cuda:{rank}")
    return torch.device(name)


class Worker:
    def __init__(self, config: ResolvedConfig, rank: int = 0, distributed_init_method: str | None = None):
        self.config = config
        self.rank = rank
        self.distributed_init_method = distributed_init_method
        self.device = resolve_device(config.device, rank)
        self.parallel = None
        self.model_runner: ModelRunner | None = None

    def init_device(self) -> None:
        """Join the process group of all ranks (none in-process; `mp`/`ray` with one rank still
        make a one-rank group, so TP=1 exercises the distributed path, NCCL on a GPU)."""
        world_size = self.config.parallel.world_size
        if self.config.parallel.executor_backend == "uni":
            return
        from fast.worker.parallel import ParallelContext

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.parallel = ParallelContext.init(self.rank, world_size, self.distributed_init_method, backend)

    def load_model(self) -> None:
        cfg = self.config
        self.model = PagedDecoder.from_pretrained(cfg.model.path, cfg.model.dtype, parallel=self.parallel,
                                                  device=self.device)
        self.model.prepack_weights()  # CPU: oneDNN's layout once, not MKL's repack on every GEMM

    def initialize_cache(self) -> None:
        cfg = self.config
        backend = get_backend(cfg.attention_backend, self.device)
        self.model_runner = ModelRunner(self.model, cfg.cache.num_blocks, cfg.cache.block_size, backend, self.device,
                                        cfg.model.hf.eos_token_ids, is_driver=self.rank == 0)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        return self.model_runner.execute_model(scheduler_output)

    def teacher_forced_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [T, vocab] of one sequence on a scratch cache (the conformance model tier)."""
        return self.model.teacher_forced_logits(token_ids, self.model_runner.backend).cpu()

    def cached_request_ids(self) -> list:
        """The samples whose state this rank's model runner holds (a leak check for tests)."""
        return list(self.model_runner.requests)

    def attention_backend_name(self) -> str:
        return self.model_runner.backend.name

    def ping(self) -> int:
        return self.rank

    def shutdown(self) -> None:
        if self.parallel is not None:
            self.parallel.destroy()
            self.parallel = None
