"""`uni`: the one worker lives in the engine's own process (the default for one rank)."""

from __future__ import annotations

from typing import Any

from fast.config import ResolvedConfig
from fast.executor.abstract import Executor
from fast.worker.worker import Worker


class UniProcExecutor(Executor):
    def __init__(self, config: ResolvedConfig):
        super().__init__(config)
        self.driver_worker = Worker(config, rank=0)
        self.driver_worker.init_device()
        self.driver_worker.load_model()
        self.driver_worker.initialize_cache()

    def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        return [getattr(self.driver_worker, method)(*args)]

    def shutdown(self) -> None:
        self.driver_worker.shutdown()
