"""`AsyncLLMEngine`: the asyncio front of `LLMEngine`, for servers.

One background task (the *loop*) owns the engine. It steps while requests are in flight and sleeps
when there are none. Callers add requests and read their outputs without ever touching the engine
concurrently with a step:

    caller task                       loop task                      worker thread
    add_requests ─────────────────────────────────────────────────> grammar compile (no lock;
                                                                     one at a time, deadline)
                 ──(lock)──────────────────────────────────────────> engine.process (tokenize)
                 ──(lock, same hold)──> engine.add_request
                              while unfinished:
                                apply pending aborts (lock)
                                step ──(lock held)──────────────> engine.step()
                                route outputs to OutputStreams
    async for batch in stream  <──── latest cumulative output per request
    stream.close() / cancel ──> abort(): pending, applied before the next step

Invariants:
- `engine.process`, `add_request`, `abort_request`, `step` and `get_metrics` run only while `_lock`
  is held, so at most one of them runs at a time (the engine, and its tokenizer, are not
  thread-safe). The slow ones (`step`, and `process`, which tokenizes) run in a worker thread, so
  the event loop keeps serving other tasks meanwhile; a caller cancelled while its work is in a
  thread does not release the lock before that thread is done.
- Every tracked request has exactly one `OutputStream`; a request leaves `_tracked` exactly once,
  when its finished output is routed or when it is aborted, and then its `RequestStats` go to
  every finish listener.
- An aborted request is aborted in the engine before the engine steps again, so its blocks are
  free by the time the next step starts.

Prompts that cannot fit `max_model_len` are rejected before the tokenizer or the engine sees
them when that is cheap and sound: token-id lists by their length, text by
`TokenCountBound` (see there for when the bound holds).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, TypeVar

from ref.outputs import CompletionOutput, RequestOutput
from ref.sampling_params import SamplingParams, StructuredOutputsParams

if TYPE_CHECKING:  # fast.engine.llm_engine imports torch; `python -m fast.entrypoints.openai_server --help` must not wait for it
    from fast.engine.llm_engine import EngineMetrics, LLMEngine

T = TypeVar("T")

COMPILE_TIMEOUT_S = 10.0  # a structured-output constraint must compile within this (README "Limits")


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


class TokenCountBound:
    """A sound lower bound on how many tokens a text prompt becomes, computed without tokenizing.

    It exists only for byte-level BPE tokenizers without a normalizer (GPT-2, Llama 3, the
    embedded tiny model): there every byte of the text lands in exactly one token and a token
    stands for at most `longest` bytes (its vocabulary string, or an added token's content), so a
    text of C characters (>= C bytes) is at least ceil(C / longest) tokens; a template's special
    tokens only add to that. Anything else gets no bound (`min_tokens` returns 0): a normalizer
    can shrink the text (NFC), a whitespace pre-tokenizer or a `Split(behavior="removed")` can
    drop parts of it, and added tokens with lstrip/rstrip swallow the whitespace beside them.
    """

    _KEEPING_SPLITS = ("isolated", "merged_with_previous", "merged_with_next", "contiguous")

    def __init__(self, tokenizer: Any):
        self.longest = self._longest_token_bytes(tokenizer)

    def min_tokens(self, text: str) -> int:
        return -(-len(text) // self.longest) if self.longest else 0

    @classmethod
    def _longest_token_bytes(cls, tokenizer: Any) -> int | None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        spec = json.loads(backend.to_str())
        if spec.get("normalizer") is not None or (spec.get("model") or {}).get("type") != "BPE":
            return None
        if not cls._keeps_every_byte(spec.get("pre_tokenizer")):
            return None
        added = spec.get("added_tokens") or []
        if any(a.get("lstrip") or a.get("rstrip") for a in added):
            return None
        lengths = [len(t.encode("utf-8")) for t in spec["model"]["vocab"]]
        lengths += [len(a["content"].encode("utf-8")) for a in added]
        return max(lengths, default=0) or None

    @classmethod
    def _keeps_every_byte(cls, pre: dict | None) -> bool:
        """A ByteLevel pre-tokenizer, alone or in a Sequence with splits that drop nothing."""
        if pre is None:
            return False
        if pre.get("type") == "ByteLevel":
            return True
        if pre.get("type") != "Sequence":
            return False
        parts = pre.get("pretokenizers") or []
        bytelevel = [p for p in parts if p.get("type") == "ByteLevel"]
        others_keep = all(p.get("type") == "ByteLevel" or (
            p.get("type") == "Split" and str(p.get("behavior", "")).lower().replace("mergedwith", "merged_with_")
            in cls._KEEPING_SPLITS) for p in parts)
        return bool(bytelevel) and others_keep


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
        self.token_bound = TokenCountBound(engine.codec.tokenizer)
        self._tracked: dict[str, _Tracked] = {}
        self._pending_aborts: set[str] = set()
        self._listeners: list[Callable[[RequestStats], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._dead: BaseException | None = None
        self._compile_pool: ThreadPoolExecutor | None = None  # created on the first constrained request

    @classmethod
    def from_options(cls, model: str, **options: Any) -> "AsyncLLMEngine":
        """Same options as `fast.LLM` (unknown ones are a ValueError listing the allowed)."""
        from fast.config import EngineConfig
        from fast.engine.llm_engine import LLMEngine

        return cls(LLMEngine(EngineConfig.from_options(model, options)))

    # ------------------------------------------------------------------ public API
    @property
    def is_running(self) -> bool:
        """False once the loop has failed (see `dead_error`)."""
        return self._dead is None

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    def check_health(self) -> bool:
        """`is_running`, after asking the executor whether its workers still live (cheap, takes no
        lock: a worker process that died while no step ran is seen here, not at the next request).
        A dead worker kills the engine: waiting requests get EngineDeadError. Call on the loop."""
        if self._dead is None:
            check = getattr(getattr(self.engine, "executor", None), "check_health", None)
            if check is not None:
                try:
                    check()
                except Exception as exc:  # noqa: BLE001 - WorkerDiedError, or whatever the executor says
                    self._die(exc)
        return self._dead is None

    @property
    def num_in_flight(self) -> int:
        return len(self._tracked)

    def add_finish_listener(self, listener: Callable[[RequestStats], None]) -> None:
        """`listener(stats)` is called on the loop once per request, when it finishes or is aborted."""
        self._listeners.append(listener)

    async def add_requests(self, requests: list[NewRequest]) -> OutputStream:
        """Validate every request, then queue them all in one go (no step runs between them).

        Raises ValueError naming the field (SPEC §4) if any is bad, or if an id is in use; then
        nothing is queued. Tokenizing runs in a worker thread (the loop stays free) while no step
        runs. If the caller is cancelled meanwhile, whatever gets queued is aborted at once.
        """
        self._ensure_loop()
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError(f"request_id must be unique, got duplicates in {ids}")
        for r in requests:
            if not isinstance(r.priority, int) or isinstance(r.priority, bool):
                raise ValueError(f"priority must be an integer, got {r.priority!r}")
            if r.params is None or r.params.truncate_prompt_tokens is None:  # truncation comes first
                self._check_fits_cheaply(r.prompt)
        for r in requests:
            if r.params is not None and r.params.structured_outputs is not None:
                await self._compile_beside_the_loop(r.params.structured_outputs)
        task = asyncio.ensure_future(self._add_locked(requests))
        try:
            stream = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_close_orphaned_stream)
            raise
        self._wake.set()
        return stream

    async def _compile_beside_the_loop(self, so: StructuredOutputsParams) -> None:
        """Compile a constraint into the engine's grammar cache without holding the lock, so the
        engine keeps stepping (xgrammar releases the GIL). Compiles run one at a time in their own
        thread, so abusive grammars (compile time grows ~cubically with some EBNF shapes) burn at
        most one core; a compile not done within COMPILE_TIMEOUT_S rejects the request (the
        compile itself cannot be interrupted: it finishes in the background)."""
        if self._compile_pool is None:
            self._compile_pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        future = self._compile_pool.submit(self.engine.structured.compile, so)
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), COMPILE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ValueError(f"structured_outputs.{so.kind} cannot be compiled within {COMPILE_TIMEOUT_S:g} s "
                             f"(compiles run one at a time; try a smaller grammar)") from None

    def _check_fits_cheaply(self, prompt: Any) -> None:
        """Reject a prompt that cannot fit max_model_len before anything copies or tokenizes it."""
        max_len = self.engine.max_model_len
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt_token_ids"), (list, tuple)):
            n = len(prompt["prompt_token_ids"])
            if n > max_len:
                raise ValueError(f"prompt length must be <= max_model_len ({max_len}), got {n} tokens")
        elif isinstance(prompt, str):
            n = self.token_bound.min_tokens(prompt)
            if n > max_len:
                raise ValueError(f"prompt length must be <= max_model_len ({max_len}), got at least {n} "
                                 f"tokens ({len(prompt)} characters)")

    async def _add_locked(self, requests: list[NewRequest]) -> OutputStream:
        async with self._lock:
            self._check_alive()
            self._apply_aborts()  # so that an aborted request's id is free again
            for r in requests:
                if r.request_id in self.engine.groups or r.request_id in self._tracked:
                    raise ValueError(f"request_id {r.request_id!r} is already in use")
            prompts = await asyncio.to_thread(self._tokenized_prompts, requests)
            stream = OutputStream(self, [r.request_id for r in requests])
            now = time.perf_counter()
            for r, prompt in zip(requests, prompts):
                self.engine.add_request(r.request_id, prompt, r.params, r.priority)
                group = self.engine.groups[r.request_id]
                self._tracked[r.request_id] = _Tracked(stream, len(group.samples), group.prompt,
                                                       list(group.prompt_token_ids), now)
        return stream

    def _tokenized_prompts(self, requests: list[NewRequest]) -> list[dict]:
        """Validate every request (tokenizing text prompts); each prompt as token ids, so that
        `add_request` does not tokenize again."""
        prompts = []
        for r in requests:
            processed, _ = self.engine.process(r.prompt, r.params)
            prompt = {"prompt_token_ids": processed.prompt_token_ids}
            if processed.prompt is not None:
                prompt["prompt"] = processed.prompt
            prompts.append(prompt)
        return prompts

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

    async def between_steps(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the loop while no step runs: for quick looks at engine state."""
        self._ensure_loop()
        async with self._lock:
            return fn(*args)

    async def between_steps_in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a worker thread while no step runs: for slow work on state a step also
        uses (e.g. chat templating and tokenizing with the engine's tokenizer). The loop stays
        free; if the caller is cancelled, the lock is still held until `fn` returns."""
        self._ensure_loop()

        async def locked() -> T:
            async with self._lock:
                return await asyncio.to_thread(fn, *args)

        return await _unless_caller_cancelled(locked())

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
        if self._compile_pool is not None:
            self._compile_pool.shutdown(wait=False, cancel_futures=True)
            self._compile_pool = None
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
        if self._dead is None:  # the first failure is the cause (a health check may see it first)
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


async def _unless_caller_cancelled(work: Awaitable[T]) -> T:
    """Await `work` in its own task: cancelling the caller does not cancel it (its outcome is
    then dropped, without an unretrieved-exception warning)."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_drop_outcome)
        raise


def _drop_outcome(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def _close_orphaned_stream(task: asyncio.Future) -> None:
    """For an add whose caller was cancelled: abort what it queued (nobody will read it)."""
    if not task.cancelled() and task.exception() is None:
        task.result().close()


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
