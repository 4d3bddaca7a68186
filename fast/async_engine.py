"""`AsyncLLMEngine`: the asyncio front of `LLMEngine`, for servers.

One background task (the *loop*) owns the engine. It steps while requests are in flight and sleeps
when there are none. Callers add requests and read their outputs without ever touching the engine
concurrently with a step:

    caller task                       loop task                      worker thread
    add_requests ──(lock)──> engine.add_request
                              while unfinished:
                                apply pending aborts (lock)
                                step ──(lock held)──────────────> engine.step()
                                route outputs to OutputStreams
    async for batch in stream  <──── latest cumulative output per request
    stream.close() / cancel ──> abort(): pending, applied before the next step

Invariants:
- `engine.add_request`, `abort_request`, `step` and `get_metrics` run only while `_lock` is held,
  so at most one of them runs at a time (the engine is not thread-safe).
- Every tracked request has exactly one `OutputStream`; a request leaves `_tracked` exactly once,
  when its finished output is routed or when it is aborted, and then its `RequestStats` go to
  every finish listener.
- An aborted request is aborted in the engine before the engine steps again, so its blocks are
  free by the time the next step starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fast.config import EngineConfig
from fast.engine import EngineMetrics, LLMEngine
from ref.outputs import CompletionOutput, RequestOutput
from ref.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop failed; no request can be served any more."""


@dataclass(frozen=True)
class NewRequest:
    request_id: str
    prompt: Any  # a string or {"prompt_token_ids": [...], "prompt"?: str}, as `LLMEngine.add_request`
    params: SamplingParams | None  # None: SamplingParams()
    priority: int = 0


@dataclass(frozen=True)
class RequestStats:
    """What a finished (or aborted) request reports to the finish listeners."""

    request_id: str
    finish_reason: str  # "abort" if the request was aborted, else its first sample's reason
    num_prompt_tokens: int
    num_generation_tokens: int  # all samples, as last reported (an abort may have run further)
    ttft_s: float | None  # from add to the first output holding a token; None if none came
    tpot_s: float | None  # (finish - first token) / (longest sample's tokens - 1); None if < 2


class OutputStream:
    """The outputs of requests added together, for one consumer.

    Iterating yields batches: the latest cumulative `RequestOutput` of every request that
    progressed since the previous batch (a slow consumer misses intermediate outputs, never
    tokens). A request's finished output is the last one it yields; iteration stops when every
    request has finished. `close()` (also on `async with` exit) aborts the unfinished ones.
    """

    def __init__(self, engine: "AsyncLLMEngine", request_ids: list[str]):
        self._engine = engine
        self.request_ids = list(request_ids)
        self._unfinished = set(request_ids)
        self._latest: dict[str, RequestOutput] = {}
        self._ready = asyncio.Event()
        self._error: BaseException | None = None

    def _put(self, output: RequestOutput) -> None:
        self._latest[output.request_id] = output
        if output.finished:
            self._unfinished.discard(output.request_id)
        self._ready.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._unfinished.clear()
        self._ready.set()

    def __aiter__(self) -> "OutputStream":
        return self

    async def __anext__(self) -> list[RequestOutput]:
        while not self._latest:
            if self._error is not None:
                raise EngineDeadError(f"the engine loop failed: {self._error!r}") from self._error
            if not self._unfinished:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        batch = list(self._latest.values())
        self._latest.clear()
        return batch

    def close(self) -> None:
        """Abort every request of this stream that has not finished (idempotent)."""
        if self._unfinished:
            self._engine.abort(list(self._unfinished))

    async def __aenter__(self) -> "OutputStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()


@dataclass
class _Tracked:
    """A request between add and finish/abort, as the loop sees it."""

    stream: OutputStream
    n: int
    prompt: str | None
    prompt_token_ids: list[int]
    added: float
    first_token: float | None = None
    last: RequestOutput | None = None


class AsyncLLMEngine:
    """asyncio front of one `LLMEngine`; see the module docstring for the loop and its invariants.

    All methods must be called from one event loop at a time. When a new event loop starts using
    it (e.g. a second `asyncio.run`), requests left over from the previous loop are aborted.
    """

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._tracked: dict[str, _Tracked] = {}
        self._pending_aborts: set[str] = set()
        self._listeners: list[Callable[[RequestStats], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._dead: BaseException | None = None

    @classmethod
    def from_options(cls, model: str, **options: Any) -> "AsyncLLMEngine":
        """Same options as `fast.LLM` (unknown ones are a ValueError listing the allowed)."""
        return cls(LLMEngine(EngineConfig.from_options(model, options)))

    # ------------------------------------------------------------------ public API
    @property
    def is_running(self) -> bool:
        """False once the loop has failed (see `dead_error`)."""
        return self._dead is None

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    @property
    def num_in_flight(self) -> int:
        return len(self._tracked)

    def add_finish_listener(self, listener: Callable[[RequestStats], None]) -> None:
        """`listener(stats)` is called on the loop once per request, when it finishes or is aborted."""
        self._listeners.append(listener)

    async def add_requests(self, requests: list[NewRequest]) -> OutputStream:
        """Validate every request, then queue them all in one go (no step runs between them).

        Raises ValueError naming the field (SPEC §4) if any is bad, or if an id is in use; then
        nothing is queued.
        """
        self._ensure_loop()
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError(f"request_id must be unique, got duplicates in {ids}")
        async with self._lock:
            self._check_alive()
            self._apply_aborts()  # so that an aborted request's id is free again
            for r in requests:
                if r.request_id in self.engine.groups or r.request_id in self._tracked:
                    raise ValueError(f"request_id {r.request_id!r} is already in use")
                if not isinstance(r.priority, int) or isinstance(r.priority, bool):
                    raise ValueError(f"priority must be an integer, got {r.priority!r}")
                self.engine.process(r.prompt, r.params)
            stream = OutputStream(self, ids)
            now = time.perf_counter()
            for r in requests:
                self.engine.add_request(r.request_id, r.prompt, r.params, r.priority)
                group = self.engine.groups[r.request_id]
                self._tracked[r.request_id] = _Tracked(stream, len(group.samples), group.prompt,
                                                       list(group.prompt_token_ids), now)
        self._wake.set()
        return stream

    async def generate(self, prompt: Any, params: SamplingParams | None, request_id: str,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request, the last with `finished=True`.

        Raises ValueError before yielding anything if the request is bad. Closing or cancelling
        the iterator early aborts the request and frees its blocks.
        """
        params = SamplingParams() if params is None else params
        stream = await self.add_requests([NewRequest(request_id, prompt, params, priority)])
        async with stream:
            async for batch in stream:
                for output in batch:
                    yield output

    def abort(self, request_id: str | list[str]) -> None:
        """Abort request(s): their streams end with a `finish_reason="abort"` output; the engine
        frees their blocks before its next step. Unknown or finished ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            tracked = self._tracked.pop(rid, None)
            if tracked is None:
                continue
            self._pending_aborts.add(rid)
            final = _aborted_output(rid, tracked)
            tracked.stream._put(final)
            self._notify(tracked, final, aborted=True)
        if ids and self._wake is not None:
            self._wake.set()

    async def between_steps(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` while no step runs: for anything that shares state with the engine (e.g.
        its tokenizer, which a step uses from the worker thread)."""
        self._ensure_loop()
        async with self._lock:
            return fn(*args)

    async def get_metrics(self) -> EngineMetrics:
        """The engine's metrics, read between steps."""
        self._ensure_loop()
        async with self._lock:
            return self.engine.get_metrics()

    async def kv_blocks(self) -> tuple[int, int]:
        """(free, total) KV blocks, read between steps."""
        self._ensure_loop()
        async with self._lock:
            return self.engine.kv.num_free_blocks, self.engine.num_blocks

    async def shutdown(self) -> None:
        """Abort everything in flight and stop the loop (after the step in progress, if any)."""
        if self._task is None or self._loop is not asyncio.get_running_loop():
            return
        self.abort(list(self._tracked))
        self._stopping = True
        self._wake.set()
        try:
            await self._task
        finally:
            self._task, self._stopping = None, False

    def check_invariants(self) -> None:
        """The module docstring's bookkeeping invariants; call while no step runs."""
        assert not self._pending_aborts & self._tracked.keys(), "an aborted request is still tracked"
        missing = [rid for rid in self._tracked if rid not in self.engine.groups]
        assert not missing, f"tracked requests the engine does not have: {missing}"
        for rid, tracked in self._tracked.items():
            assert rid in tracked.stream._unfinished, f"{rid}: tracked but its stream saw it finish"

    # ------------------------------------------------------------------ the loop
    def _ensure_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._adopt_loop(loop)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="pagedlm-engine-loop")

    def _adopt_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind the asyncio primitives to `loop`; whatever the previous loop left is aborted.

        No step can be running here: a loop's worker threads are joined when it shuts down.
        """
        self.abort(list(self._tracked))
        self._apply_aborts()
        self._loop, self._task = loop, None
        self._lock, self._wake = asyncio.Lock(), asyncio.Event()

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop failed: {self._dead!r}") from self._dead

    async def _run(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._step_while_busy()
            except Exception as exc:  # noqa: BLE001 - every stream must hear about it
                self._die(exc)
                return

    async def _step_while_busy(self) -> None:
        while True:
            async with self._lock:
                self._apply_aborts()
                if self._stopping or not self.engine.has_unfinished_requests():
                    return
                outputs = await asyncio.to_thread(self.engine.step)
            self._route(outputs)
            await asyncio.sleep(0)  # let handlers read their outputs and queue new requests

    def _apply_aborts(self) -> None:
        """Abort the pending ids in the engine; call only while no step runs."""
        if self._pending_aborts:
            self.engine.abort_request(sorted(self._pending_aborts))
            self._pending_aborts.clear()

    def _route(self, outputs: list[RequestOutput]) -> None:
        now = time.perf_counter()
        for output in outputs:
            tracked = self._tracked.get(output.request_id)
            if tracked is None:  # aborted while the step ran
                continue
            tracked.last = output
            if tracked.first_token is None and any(c.token_ids for c in output.outputs):
                tracked.first_token = now
            tracked.stream._put(output)
            if output.finished:
                del self._tracked[output.request_id]
                self._notify(tracked, output, aborted=False, now=now)

    def _die(self, exc: BaseException) -> None:
        self._dead = exc
        for tracked in self._tracked.values():
            tracked.stream._fail(exc)
        self._tracked.clear()

    def _notify(self, tracked: _Tracked, final: RequestOutput, aborted: bool, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        longest = max((len(c.token_ids) for c in final.outputs), default=0)
        ttft = tpot = None
        if tracked.first_token is not None:
            ttft = tracked.first_token - tracked.added
            if longest > 1:
                tpot = (now - tracked.first_token) / (longest - 1)
        stats = RequestStats(
            request_id=final.request_id,
            finish_reason="abort" if aborted else final.outputs[0].finish_reason,
            num_prompt_tokens=len(tracked.prompt_token_ids),
            num_generation_tokens=sum(len(c.token_ids) for c in final.outputs),
            ttft_s=ttft, tpot_s=tpot,
        )
        for listener in self._listeners:
            listener(stats)


def _aborted_output(request_id: str, tracked: _Tracked) -> RequestOutput:
    """The last known output with every unfinished sample marked "abort"."""
    last = tracked.last
    if last is None:
        samples = [CompletionOutput(i, "", [], None, None) for i in range(tracked.n)]
    else:
        samples = [dataclasses.replace(c) for c in last.outputs]
    for c in samples:
        if c.finish_reason is None:
            c.finish_reason = "abort"
    return RequestOutput(request_id, tracked.prompt, list(tracked.prompt_token_ids),
                         last.prompt_logprobs if last is not None else None, samples, finished=True)
