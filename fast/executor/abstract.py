"""`Executor`: the interface between the engine and its workers, and the choice of one."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from fast.config import ResolvedConfig
from fast.core.outputs import ModelRunnerOutput, SchedulerOutput


class WorkerDiedError(RuntimeError):
    """A worker process or actor died or raised: the engine cannot go on."""


class Executor(ABC):
    """Runs every step on all ranks. Workers are built by `__init__` (device, model shard, KV
    cache); `shutdown` leaves no worker behind and may be called more than once."""

    def __init__(self, config: ResolvedConfig):
        self.config = config

    @staticmethod
    def create(config: ResolvedConfig) -> "Executor":
        backend = config.parallel.executor_backend
        if backend == "uni":
            from fast.executor.uniproc import UniProcExecutor

            return UniProcExecutor(config)
        if backend == "mp":
            from fast.executor.multiproc import MultiprocExecutor

            return MultiprocExecutor(config)
        from fast.executor.ray_executor import RayExecutor

        return RayExecutor(config)

    @abstractmethod
    def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        """Call `Worker.<method>(*args)` on every rank; the results in rank order."""

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.collective_rpc("execute_model", (scheduler_output,))[0]

    def driver_call(self, method: str, args: tuple = ()) -> Any:
        """A call every rank must make (collectives inside), whose result is rank 0's."""
        return self.collective_rpc(method, args)[0]

    def check_health(self) -> None:
        """Raise WorkerDiedError if a worker is gone."""

    @abstractmethod
    def shutdown(self) -> None: ...
