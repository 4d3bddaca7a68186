"""`ray`: one Ray actor per rank, on one machine or across a Ray cluster.

Install the extra first: `pip install 'pagedlm[ray]'` (in a checkout: `pip install -e '.[ray]'`).

Each rank is a `RayWorkerWrapper` actor holding a `fast.worker.Worker`; the engine sends every
rank the same call (its arguments `ray.put` once) and rank 0, the driver, gives the result
(`execute_model` returns rank 0's `ModelRunnerOutput`). The ranks meet in torch.distributed
(gloo on CPU, NCCL on GPU) at a tcp address on rank 0's node: 127.0.0.1 when every rank is on
that node, else that node's IP, on a port found free there by rank 0's actor.

Which Ray:
- if this process is already connected (`ray.init(...)` was called), that instance is used and
  left running at shutdown;
- else, if `RAY_ADDRESS` is set, `ray.init(address="auto")` joins that existing cluster (start
  one with `ray start --head` on one machine and `ray start --address=<head>:6379` on the others;
  every node needs the same Python environment with pagedlm installed and the model directory
  at the same path);
- else a local Ray instance is started, and shut down with the executor.

Placement:
- one node (the usual case): plain actors that reserve no CPU (`num_cpus=0`, so any number of
  ranks fit, e.g. 2 in `ray.init(num_cpus=2)`) and, on GPU, one GPU each (`num_gpus=1`);
- several nodes: a placement group of `world_size` bundles ({"GPU": 1} each, or {"CPU": 1} on
  CPU), strategy PACK (as few nodes as possible, so ranks share fast links where they can);
  rank r runs in bundle r. If the cluster cannot reserve it within `PLACEMENT_TIMEOUT_S`, the
  executor fails with a message naming the bundles instead of waiting forever.
- device: on GPU each actor uses the one GPU Ray gave it (Ray sets CUDA_VISIBLE_DEVICES),
  whatever index `device` named; "auto" means GPUs when the cluster has any, else CPU.
- threads: OMP_NUM_THREADS of the engine process if set, else each rank runs torch on its share
  of its node's CPUs (cpus // ranks on that node), as the `mp` executor does (Ray alone would
  give an actor that reserves no CPU one thread).

Failure is never a hang:
- a worker that raises (ray.exceptions.RayTaskError) or an actor that dies (RayActorError:
  killed, segfault, OOM, its node lost) makes the waiting call raise `WorkerDiedError` as soon as
  Ray reports it (the wait wakes every `POLL_S`). The root cause comes first: a rank that raised
  may only have lost its peer in a collective, so the other ranks get `PEER_GRACE_S` to report a
  death. Every actor is then killed (one may be blocked in a collective with the failed one) and
  the executor is dead from then on. A call interrupted in the engine process (Ctrl-C) also ends
  the actors: their answers, and their per-request state, no longer match the engine's.
- start-up (model load included) is bounded by `STARTUP_TIMEOUT_S`;
- `check_health` never blocks: it reads the answers to its previous pings (sent on a separate
  concurrency group, so they are answered while a step is in flight) and sends new ones; an
  actor that is dead, or has not answered for `HEALTH_TIMEOUT_S`, is a WorkerDiedError;
- the actors never outlive the engine: `shutdown` (also run when the executor is collected or
  the interpreter exits) kills them, removes the placement group and stops Ray if this executor
  started it; and Ray kills an owner's actors when the owning process exits, however it ends.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
import weakref
from typing import Any, NoReturn

from fast.config import ResolvedConfig
from fast.executor.abstract import Executor, WorkerDiedError

POLL_S = 0.5  # how often a wait for the actors wakes up to check its deadline
STARTUP_TIMEOUT_S = 600.0  # loading a large model shard may take minutes
PLACEMENT_TIMEOUT_S = 120.0  # for the cluster to reserve the placement group
HEALTH_TIMEOUT_S = 30.0  # for every actor to answer a ping
PEER_GRACE_S = 0.5  # after a rank raises, how long to look for a peer whose death caused it
HEALTH_GROUP = "health"  # the actors' concurrency group for pings (the default group runs the worker)


def import_ray():
    """`ray`, or an ImportError that names the extra to install."""
    try:
        import ray
    except ImportError as e:
        raise ImportError(
            "distributed_executor_backend='ray' needs Ray, which is not installed: "
            "pip install 'pagedlm[ray]' (in a checkout: pip install -e '.[ray]')"
        ) from e
    return ray


class RayWorkerWrapper:
    """The body of one rank's actor (made an actor class by `ray.remote` at start-up). The worker's
    methods all run on one thread, one call at a time; `ping` runs on the health group's thread."""

    def __init__(self, rank: int):
        self.rank = rank
        self.worker = None

    def node(self) -> tuple[str, str, int]:
        """(node id, node IP) of the node this actor runs on, and its process id."""
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), os.getpid()

    def free_port(self, host: str) -> int:
        with socket.socket() as s:
            s.bind((host, 0))
            return s.getsockname()[1]

    def init_worker(self, config: ResolvedConfig, init_method: str, use_gpu: bool, num_threads: int | None,
                    ranks_on_node: int) -> None:
        """Build the worker: join the process group (all ranks at once), load the shard, the cache."""
        import torch

        from fast.worker.worker import Worker

        if num_threads is None:
            try:
                cpus = len(os.sched_getaffinity(0))
            except AttributeError:
                cpus = os.cpu_count() or 1
            num_threads = max(1, cpus // ranks_on_node)
        torch.set_num_threads(num_threads)
        config = dataclasses.replace(config, device=_actor_device() if use_gpu else "cpu")
        self.worker = Worker(config, self.rank, init_method)
        self.worker.init_device()
        self.worker.load_model()
        self.worker.initialize_cache()

    def execute_method(self, method: str, args: tuple) -> Any:
        return getattr(self.worker, method)(*args)

    def ping(self) -> int:
        return self.rank


def _actor_device() -> str:
    """The torch device of the GPU Ray assigned to this actor (it sees only that one unless
    RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES is set)."""
    import ray

    gpu = str(ray.get_gpu_ids()[0])
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return f"cuda:{visible.index(gpu) if gpu in visible else int(gpu)}"


class RayExecutor(Executor):
    def __init__(self, config: ResolvedConfig):
        super().__init__(config)
        ray = import_ray()
        self._ray = ray
        self._dead: str | None = None
        self.actors: list = []
        self.worker_pids: list[int] = []  # each on its rank's node
        self.worker_ips: list[str] = []
        self._pings: dict[int, Any] = {}  # rank -> the answer to check_health's last ping
        self._pings_sent = 0.0
        # Shared with the finalizer (which must not hold self): actors, placement group, Ray owned.
        self._state: dict[str, Any] = {"actors": [], "pg": None, "owns_ray": False}
        self._finalizer = weakref.finalize(self, _shutdown, self._state)
        try:
            if not ray.is_initialized():
                if os.environ.get("RAY_ADDRESS"):
                    ray.init(address="auto")
                else:
                    self._state["owns_ray"] = True
                    ray.init(include_dashboard=False)
            self._start(config)
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ start-up
    def _start(self, config: ResolvedConfig) -> None:
        ray = self._ray
        world_size = config.parallel.world_size
        use_gpu = self._use_gpu(config.device, world_size)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        strategies: list[Any] = [None] * world_size
        if len(nodes) > 1:
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            bundles = [{"GPU": 1} if use_gpu else {"CPU": 1} for _ in range(world_size)]
            pg = placement_group(bundles, strategy="PACK", name=f"pagedlm-tp{world_size}-{os.getpid()}")
            self._state["pg"] = pg
            try:
                ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(
                    f"the Ray cluster ({len(nodes)} nodes, {ray.cluster_resources()}) could not reserve "
                    f"{world_size} bundles {bundles[0]} within {PLACEMENT_TIMEOUT_S:.0f} s"
                ) from None
            strategies = [PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)
                          for rank in range(world_size)]
        actor_class = ray.remote(concurrency_groups={HEALTH_GROUP: 1})(RayWorkerWrapper)
        for rank in range(world_size):
            options: dict[str, Any] = {"num_cpus": 0, "num_gpus": 1 if use_gpu else 0}
            if strategies[rank] is not None:
                options["scheduling_strategy"] = strategies[rank]
            self.actors.append(actor_class.options(**options).remote(rank))
            self._state["actors"].append(self.actors[-1])
        where = self._gather("start-up", [a.node.remote() for a in self.actors], timeout=STARTUP_TIMEOUT_S)
        node_ids = [node_id for node_id, _, _ in where]
        self.worker_ips = [ip for _, ip, _ in where]
        self.worker_pids = [pid for _, _, pid in where]
        host = "127.0.0.1" if len(set(node_ids)) == 1 else self.worker_ips[0]
        port = self._gather("start-up", [self.actors[0].free_port.remote(host)], timeout=STARTUP_TIMEOUT_S)[0]
        init_method = f"tcp://{host}:{port}"
        num_threads = _env_threads()
        config_ref = ray.put(config.for_workers())  # no scheduler config: workers never schedule
        self._gather("start-up", [a.init_worker.remote(config_ref, init_method, use_gpu, num_threads,
                                                       node_ids.count(node_ids[rank]))
                                  for rank, a in enumerate(self.actors)], timeout=STARTUP_TIMEOUT_S)

    def _use_gpu(self, device: str, world_size: int) -> bool:
        gpus = int(self._ray.cluster_resources().get("GPU", 0))
        if device == "cpu" or (device == "auto" and gpus == 0):
            return False
        if gpus < world_size:
            raise ValueError(f"device={device!r} with tensor_parallel_size={world_size} needs {world_size} "
                             f"GPUs in the Ray cluster, which has {gpus}")
        return True

    # ------------------------------------------------------------------ calls
    def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        if self._dead is not None:
            raise WorkerDiedError(self._dead)
        try:
            args_ref = self._ray.put(args)  # serialized once for all ranks
            return self._gather(method, [a.execute_method.remote(method, args_ref) for a in self.actors])
        except WorkerDiedError:
            raise
        except BaseException:  # interrupted (Ctrl-C): the actors' state no longer matches the engine's
            if self._dead is None:
                self._dead = f"interrupted during {method}: the workers were stopped"
            self.shutdown()
            raise

    def _gather(self, method: str, refs: list, timeout: float | None = None) -> list[Any]:
        """Every rank's answer, in rank order; WorkerDiedError as soon as one fails (or at the deadline)."""
        ray = self._ray
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
            failed = {}
            for ref in ready:
                try:
                    results[rank_of[ref]] = ray.get(ref)
                except ray.exceptions.RayError as e:
                    failed[rank_of[ref]] = e
            if failed:
                self._fail(method, failed, {rank_of[ref]: ref for ref in pending})
            if pending and deadline is not None and time.monotonic() > deadline:
                self._fail(method, {}, {rank_of[ref]: ref for ref in pending}, timed_out=timeout)
        return results

    def _fail(self, method: str, failed: dict[int, Exception], pending: dict[int, Any],
              timed_out: float | None = None) -> NoReturn:
        """Kill every actor, remember why, raise WorkerDiedError; a death is named before an error."""
        ray = self._ray
        failed = dict(failed)
        if pending and timed_out is None and not any(isinstance(e, ray.exceptions.RayActorError)
                                                     for e in failed.values()):
            ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=PEER_GRACE_S)
            for rank, ref in pending.items():
                if ref in ready:
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayError as e:
                        failed[rank] = e
        lines = []
        if timed_out is not None:
            lines.append(f"workers {sorted(pending)} did not finish {method} within {timed_out:.0f} s")
        for rank in sorted(failed, key=lambda r: (not isinstance(failed[r], ray.exceptions.RayActorError), r)):
            e = failed[rank]
            what = ("died" if isinstance(e, ray.exceptions.RayActorError)
                    else "raised" if isinstance(e, ray.exceptions.RayTaskError) else "failed")
            lines.append(f"{self._name(rank)} {what} during {method}: {e}")
        if self._dead is None:
            self._dead = "\n".join(lines) or f"a worker failed during {method}"
        self.shutdown()
        raise WorkerDiedError(self._dead)

    def _name(self, rank: int) -> str:
        if rank < len(self.worker_pids):
            return f"worker {rank} (pid {self.worker_pids[rank]} on {self.worker_ips[rank]})"
        return f"worker {rank}"

    def check_health(self) -> None:
        """Cheap and non-blocking (the async engine calls it on its event loop, maybe while a step
        is in flight in another thread): reads the answers to the previous call's pings, which run
        on each actor's health thread, and sends new ones. A dead actor is seen by the first call
        after Ray reports it; one that has not answered for `HEALTH_TIMEOUT_S` counts as dead."""
        if self._dead is not None:
            raise WorkerDiedError(self._dead)
        ray = self._ray
        if self._pings:
            refs = list(self._pings.values())
            ready, pending = ray.wait(refs, num_returns=len(refs), timeout=0)
            failed = {}
            for rank, ref in self._pings.items():
                if ref in ready:
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayError as e:
                        failed[rank] = e
            waiting = {rank: ref for rank, ref in self._pings.items() if ref in pending}
            if failed:
                self._fail("check_health", failed, waiting)
            if waiting:
                if time.monotonic() - self._pings_sent > HEALTH_TIMEOUT_S:
                    self._fail("check_health", {}, waiting, timed_out=HEALTH_TIMEOUT_S)
                return
        self._pings = {rank: a.ping.options(concurrency_group=HEALTH_GROUP).remote()
                       for rank, a in enumerate(self.actors)}
        self._pings_sent = time.monotonic()

    def shutdown(self) -> None:
        if self._dead is None:
            self._dead = "the executor was shut down"
        self._finalizer()


def _env_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def _shutdown(state: dict[str, Any]) -> None:
    """Kill the actors, remove the placement group, stop Ray if this executor started it.
    Idempotent; quiet when Ray is already down (e.g. at interpreter exit)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    actors, state["actors"] = state["actors"], []
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:
            pass
    pg, state["pg"] = state["pg"], None
    if pg is not None:
        try:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(pg)
        except Exception:
            pass
    if state["owns_ray"]:
        state["owns_ray"] = False
        ray.shutdown()
