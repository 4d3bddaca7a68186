"""`mp`: one worker process per rank on this machine (the default for tensor_parallel_size > 1).

The engine process sends every rank the same call through a pipe (pickled once) and waits for all
answers; the ranks meet each other in torch.distributed (gloo on CPU, NCCL on CUDA) for the
collectives inside the model.

Starting workers: never a fork of the engine process (it may hold threads or CUDA). By default
they fork from multiprocessing's *forkserver*, a fresh interpreter started once per engine
process that imports torch and the worker code (`FORKSERVER_PRELOAD`) and nothing else: the
first engine pays for that import once (~3 s), later engines in the same process start in about
a second instead of every rank importing torch anew. `PAGEDLM_WORKER_START_METHOD=spawn` (or a
platform without forkserver) spawns each worker instead. Either way a worker imports the main
module, so a script that builds a multi-rank engine at import time needs the usual
`if __name__ == "__main__":` guard. (The forkserver is process-wide: its preload list is set here,
without `__main__`, if it is not running yet; and its workers see the environment variables the
forkserver started with, not later changes.)

Each worker's OS name is `fast-worker-<rank>`, and unless OMP_NUM_THREADS is set it runs torch on
its share of the CPUs (cpus // world size threads, as vLLM does): ranks that each used every CPU
would fight over the cores in every collective (measured on 2 busy cores: 10x slower steps).

Failure is never a hang:
- a worker that raises answers with its traceback; a worker that dies (killed, segfault, OOM) is
  seen at once (the wait includes every process's sentinel). Either way the executor raises
  `WorkerDiedError` naming the rank, its pid and the exit signal or the traceback, kills every
  other rank at once (one may be blocked in a collective with the failed one) and is dead from
  then on. A call interrupted in the engine process (Ctrl-C) also ends the workers: their
  answers, and their per-request state, no longer match the engine's.
- a worker never outlives the engine: it exits when its pipe reaches EOF, and a thread in it
  ends it as soon as the engine process is gone, however that process ended (even while it is
  busy in a collective). Not PR_SET_PDEATHSIG: that fires when the *thread* that started the
  worker exits (it killed the workers of an engine built in a short-lived thread), and a
  forkserver's worker is not the engine's child. The forkserver itself exits with the engine
  process.
- `shutdown` (also run when the executor is collected or the interpreter exits) asks each worker
  to exit, then kills what is left after `SHUTDOWN_TIMEOUT_S`; a worker exits with os._exit,
  skipping the seconds of interpreter teardown that torch costs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
import weakref
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from typing import Any, NoReturn

from fast.config import ResolvedConfig
from fast.executor.abstract import Executor, WorkerDiedError

FORKSERVER_PRELOAD = ["fast.executor.multiproc", "fast.worker.worker"]
START_METHOD_ENV = "PAGEDLM_WORKER_START_METHOD"  # "forkserver" (default where available) or "spawn"
STARTUP_TIMEOUT_S = 600.0  # loading a large model shard may take minutes
SHUTDOWN_TIMEOUT_S = 5.0  # a worker asked to exit gets this long before it is killed
PEER_GRACE_S = 0.5  # after a rank raises, how long to look for a peer whose death caused it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context():
    methods = mp.get_all_start_methods()
    method = os.environ.get(START_METHOD_ENV) or ("forkserver" if "forkserver" in methods else "spawn")
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"{START_METHOD_ENV} must be 'forkserver' or 'spawn' (never fork the engine), got {method!r}")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)  # no effect once the server runs
    return ctx


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "closed its pipe"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class MultiprocExecutor(Executor):
    def __init__(self, config: ResolvedConfig):
        super().__init__(config)
        world_size = config.parallel.world_size
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = _context()
        self.procs: list[mp.process.BaseProcess] = []
        self.pipes: list[Connection] = []
        self._dead: str | None = None
        # Shut the workers down when the executor is collected or the interpreter exits.
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self.pipes)
        try:
            for rank in range(world_size):
                parent_end, child_end = ctx.Pipe()
                # Not the scheduler's config: workers never schedule, and a user's policy object need not pickle.
                proc = ctx.Process(target=_worker_main,
                                   args=(config.for_workers(), rank, init_method, child_end, os.getpid()),
                                   name=f"fast-worker-{rank}", daemon=True)
                self.pipes.append(parent_end)
                proc.start()
                child_end.close()
                self.procs.append(proc)
            self._gather("start-up", timeout=STARTUP_TIMEOUT_S)  # each worker reports once its model and cache are ready
        except BaseException:
            self.shutdown()
            raise

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        if self._dead is not None:
            raise WorkerDiedError(self._dead)
        message = ForkingPickler.dumps((method, args))  # once, not once per rank
        try:
            for rank, pipe in enumerate(self.pipes):
                try:
                    pipe.send_bytes(message)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    self.procs[rank].join(timeout=1.0)  # for its exit code
                    self._fail(method, died=[rank])
            return self._gather(method)
        except WorkerDiedError:
            raise
        except BaseException:  # interrupted (Ctrl-C): the answers in flight would answer the next call
            if self._dead is None:
                self._dead = f"interrupted during {method}: the workers were stopped"
            _kill(self.procs)
            raise

    def _gather(self, method: str, timeout: float | None = None) -> list[Any]:
        """One answer from every rank, in rank order; WorkerDiedError as soon as one fails."""
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        died: list[int] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(results) < len(self.pipes):
            pending = [r for r in range(len(self.pipes)) if r not in results]
            objects = [self.pipes[r] for r in pending] + [self.procs[r].sentinel for r in pending]
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait(objects, timeout=left)
            if not ready and deadline is not None and time.monotonic() >= deadline:
                self._fail(method, timed_out=timeout)
            for rank in pending:
                pipe = self.pipes[rank]
                if pipe in ready or pipe.poll():
                    try:
                        status, value = pipe.recv()
                    except (EOFError, OSError):
                        died.append(rank)
                        continue
                    if status == "error":
                        errors[rank] = value
                    else:
                        results[rank] = value
                elif self.procs[rank].sentinel in ready:
                    died.append(rank)
            if errors or died:
                self._fail(method, died=died, errors=errors)
        return [results[r] for r in range(len(self.pipes))]

    def _fail(self, method: str, died: list[int] = (), errors: dict[int, str] | None = None,
              timed_out: float | None = None) -> NoReturn:
        """Kill every worker, remember why, raise WorkerDiedError. The root cause comes first: a
        rank that raised may only have lost its peer in a collective, so look briefly for a death."""
        errors = dict(errors or {})
        died = set(died)
        if errors and not died:
            deadline = time.monotonic() + PEER_GRACE_S
            while not died and time.monotonic() < deadline:
                died = {r for r, p in enumerate(self.procs) if r not in errors and p.exitcode is not None}
                time.sleep(0.02)
        for rank, pipe in enumerate(self.pipes):  # tracebacks other ranks already sent
            if rank not in errors and rank not in died:
                try:
                    if pipe.poll():
                        status, value = pipe.recv()
                        if status == "error":
                            errors[rank] = value
                except (EOFError, OSError):
                    died.add(rank)
        _kill(self.procs)
        lines = []
        if timed_out is not None:
            lines.append(f"the workers did not finish {method} within {timed_out:.0f} s")
        for rank in sorted(died):
            proc = self.procs[rank]
            line = f"worker {rank} (pid {proc.pid}) died during {method}: {_exit_reason(proc.exitcode)}"
            if method == "start-up" and proc.exitcode == 1:
                line += (" (its traceback is on stderr; a script that builds the engine at import time needs "
                         "`if __name__ == '__main__':`, since worker processes import the main module)")
            lines.append(line)
        for rank in sorted(errors):
            lines.append(f"worker {rank} (pid {self.procs[rank].pid}) raised during {method}:\n{errors[rank].rstrip()}")
        if self._dead is None:
            self._dead = "\n".join(lines) or f"a worker failed during {method}"
        raise WorkerDiedError(self._dead)

    def check_health(self) -> None:
        """Cheap and non-blocking: may be called from another thread while a call is in flight
        (that call then fails too, as the workers are killed)."""
        if self._dead is not None:
            raise WorkerDiedError(self._dead)
        died = [rank for rank, proc in enumerate(self.procs) if not proc.is_alive()]
        if died:  # no pipe is read here: a call in flight in another thread owns them
            _kill(self.procs)
            if self._dead is None:
                self._dead = "\n".join(f"worker {r} (pid {self.procs[r].pid}) died: {_exit_reason(self.procs[r].exitcode)}"
                                       for r in died)
            raise WorkerDiedError(self._dead)

    def shutdown(self) -> None:
        if self._dead is None:
            self._dead = "the executor was shut down"
        self._finalizer()


def _kill(procs: list) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    for proc in procs:
        proc.join(timeout=SHUTDOWN_TIMEOUT_S)


def _shutdown(procs: list, pipes: list[Connection]) -> None:
    """Ask each worker to exit, then make sure: kill what is left. Idempotent."""
    for pipe in pipes:
        try:
            pipe.send(("shutdown", ()))
        except (BrokenPipeError, OSError):
            pass
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    _kill(procs)
    for pipe in pipes:
        pipe.close()


# ---------------------------------------------------------------------------------- the worker
def _exit_with_parent(parent_pid: int) -> None:
    """End this worker as soon as the engine process is gone, whatever this worker is doing."""

    def watch() -> None:
        try:
            fd = os.pidfd_open(parent_pid)  # readable once the process has exited
        except (AttributeError, OSError):  # no pidfd here, or the parent is already gone
            fd = None
        if fd is not None:
            select.select([fd], [], [])
        else:
            while _alive(parent_pid):
                time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="fast-worker-parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _set_process_name(name: str) -> None:
    """The OS-level name (`ps`, psutil's `name()`), Linux only; 15 bytes at most."""
    try:
        import ctypes

        PR_SET_NAME = 15
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def worker_threads(world_size: int) -> int | None:
    """The torch threads each worker sets: its share of this machine's CPUs; None when
    OMP_NUM_THREADS is set (torch's own choice from it stands)."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, cpus // world_size)


def _set_threads(world_size: int) -> None:
    threads = worker_threads(world_size)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _worker_main(config: ResolvedConfig, rank: int, init_method: str, pipe: Connection, parent_pid: int) -> None:
    """A worker process: build the worker, then serve calls until shutdown or EOF."""
    _exit_with_parent(parent_pid)
    _set_process_name(f"fast-worker-{rank}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's to handle
    worker = None
    try:
        _set_threads(config.parallel.world_size)
        from fast.worker.worker import Worker

        worker = Worker(config, rank, init_method)
        worker.init_device()
        worker.load_model()
        worker.initialize_cache()
        pipe.send(("ok", None))
        while True:
            try:
                method, args = pipe.recv()
            except (EOFError, OSError):  # the engine is gone
                break
            if method == "shutdown":
                break
            try:
                pipe.send(("ok", getattr(worker, method)(*args)))
            except BaseException:
                pipe.send(("error", traceback.format_exc()))
    except BaseException:
        try:
            pipe.send(("error", traceback.format_exc()))
        except (BrokenPipeError, OSError):
            pass
    finally:
        if worker is not None:
            try:
                worker.shutdown()
            except BaseException:
                pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # no interpreter teardown: seconds with torch loaded, and nothing left to save
