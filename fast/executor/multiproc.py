"""`mp`: one worker process per rank on this machine (the default for tensor_parallel_size > 1).

The engine process sends every rank the same call through a pipe and waits for all answers;
the ranks meet each other in torch.distributed (gloo on CPU, NCCL on CUDA) for the collectives
inside the model. Failure is never a hang:
- a worker that raises answers with its traceback; the executor raises `WorkerDiedError`;
- a worker that dies (killed, segfault, OOM) is seen within `POLL_S` while waiting, by its exit
  code, and the executor raises `WorkerDiedError` (the engine is dead from then on);
- a worker never outlives the engine: it exits when its pipe reaches EOF (the engine's end of
  it closed, however the engine process ended) and, on Linux, gets SIGKILL when its parent dies.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import traceback
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any

from fast.config import ResolvedConfig
from fast.executor.abstract import Executor, WorkerDiedError

POLL_S = 0.5  # how often a wait for the workers checks that they are all alive
STARTUP_TIMEOUT_S = 600.0  # loading a large model shard may take minutes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiprocExecutor(Executor):
    def __init__(self, config: ResolvedConfig):
        super().__init__(config)
        world_size = config.parallel.world_size
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")  # never fork a process that may hold threads or CUDA
        self.procs: list[mp.process.BaseProcess] = []
        self.pipes: list[Connection] = []
        self._dead: str | None = None
        for rank in range(world_size):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(config, rank, init_method, child_end),
                               name=f"fast-worker-{rank}", daemon=True)
            proc.start()
            child_end.close()
            self.procs.append(proc)
            self.pipes.append(parent_end)
        # Shut the workers down when the executor is collected or the interpreter exits.
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self.pipes)
        try:
            self._gather(timeout=STARTUP_TIMEOUT_S)  # each worker reports once its model and cache are ready
        except BaseException:
            self.shutdown()
            raise

    def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        if self._dead is not None:
            raise WorkerDiedError(self._dead)
        for pipe in self.pipes:
            try:
                pipe.send((method, args))
            except (BrokenPipeError, OSError):
                self._fail("a worker's pipe is closed")
        return self._gather()

    def _gather(self, timeout: float | None = None) -> list[Any]:
        """One answer from every rank, in rank order; WorkerDiedError as soon as one is gone."""
        results: dict[int, Any] = {}
        waited = 0.0
        while len(results) < len(self.pipes):
            pending = [p for r, p in enumerate(self.pipes) if r not in results]
            for pipe in wait(pending, timeout=POLL_S):
                rank = self.pipes.index(pipe)
                try:
                    status, value = pipe.recv()
                except (EOFError, OSError):
                    self._fail(f"worker {rank} died (exit code {self.procs[rank].exitcode})")
                if status == "error":
                    self._fail(f"worker {rank} raised:\n{value}")
                results[rank] = value
            for rank, proc in enumerate(self.procs):
                if rank not in results and not proc.is_alive():
                    self._fail(f"worker {rank} died (exit code {proc.exitcode})")
            waited += POLL_S
            if timeout is not None and waited > timeout:
                self._fail(f"workers did not start within {timeout:.0f} s")
        return [results[r] for r in range(len(self.pipes))]

    def _fail(self, message: str) -> None:
        self._dead = message
        self.shutdown()
        raise WorkerDiedError(message)

    def check_health(self) -> None:
        if self._dead is not None:
            raise WorkerDiedError(self._dead)
        for rank, proc in enumerate(self.procs):
            if not proc.is_alive():
                self._fail(f"worker {rank} died (exit code {proc.exitcode})")

    def shutdown(self) -> None:
        self._finalizer()


def _shutdown(procs: list, pipes: list[Connection]) -> None:
    """Ask each worker to exit, then make sure: terminate, kill. Idempotent."""
    for pipe in pipes:
        try:
            pipe.send(("shutdown", ()))
        except (BrokenPipeError, OSError):
            pass
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    for pipe in pipes:
        pipe.close()


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the engine process ends, however it ends."""
    parent = os.getppid()
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: EOF on the pipe still ends the loop
        return
    if os.getppid() != parent:
        os._exit(1)


def _worker_main(config: ResolvedConfig, rank: int, init_method: str, pipe: Connection) -> None:
    """A worker process: build the worker, then serve calls until shutdown or EOF."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's to handle
    from fast.worker.worker import Worker

    worker = None
    try:
        worker = Worker(config, rank, init_method)
        worker.init_device()
        worker.load_model()
        worker.initialize_cache()
        pipe.send(("ok", None))
    except BaseException:
        pipe.send(("error", traceback.format_exc()))
        return
    try:
        while True:
            try:
                method, args = pipe.recv()
            except (EOFError, OSError):  # the engine is gone
                return
            if method == "shutdown":
                return
            try:
                pipe.send(("ok", getattr(worker, method)(*args)))
            except BaseException:
                pipe.send(("error", traceback.format_exc()))
    finally:
        worker.shutdown()
