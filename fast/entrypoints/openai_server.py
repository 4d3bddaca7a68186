"""`python -m fast.serve`: an OpenAI-compatible HTTP server over `AsyncLLMEngine` (FastAPI + uvicorn).

Endpoints:
    POST /v1/completions        prompt: string, list of strings, token ids, or lists of token ids
    POST /v1/chat/completions   messages, through the chat template (fast/entrypoints/chat_template.py)
        both: "stream": true sends server-sent events, one `data: {chunk}` per update, then
        `data: [DONE]`; usage counts ride on the last chunk (or, with
        stream_options.include_usage, on a final chunk with no choices, as OpenAI does)
    GET  /v1/models             the one served model
    GET  /health                200 while the engine loop and its workers are alive, else 503
    GET  /metrics               Prometheus text (fast/entrypoints/server_metrics.py)

Errors: OpenAI's body `{"error": {"message", "type", "param", "code"}}`; 400 for malformed JSON,
invalid fields and prompts the engine rejects (e.g. longer than max_model_len); 404
(code "model_not_found", param "model") for a model name that is not served, as OpenAI does.
A client that disconnects (streaming or not) aborts its requests, freeing their KV blocks.

Hardening (`ServerConfig`; each field is a flag):
- POST bodies must be `Content-Type: application/json` (parameters such as charset allowed), else
  415: a web page on any origin may send text/plain or form posts to localhost without a CORS
  preflight, and must not be able to start generations.
- A body over `max_request_body_bytes` is a 413 naming the limit, decided from Content-Length
  before anything is read, or while the chunks are counted as they arrive; at most the limit
  (plus one chunk) is ever held.
- Tokenizing and chat templating run in a worker thread while no step runs
  (`AsyncLLMEngine.between_steps_in_thread`), so /health and other calls are answered meanwhile.
- A /v1/completions prompt list longer than `max_prompts_per_request` is a 400 (param "prompt"):
  each prompt becomes an engine request, and a small body can hold very many.
- /docs, /redoc and /openapi.json exist only with `enable_docs` (`--enable-docs`).

`python -m fast.serve --help` does not import the engine: `fast.engine.llm_engine` (and torch) load in
`main`, when a server is built. (While `ref/__init__.py` imports `ref.engine` eagerly, torch still
loads through `fast.config` -> `ref.config`.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect

from fast.engine.async_llm_engine import AsyncLLMEngine, EngineDeadError, NewRequest, OutputStream
from fast.entrypoints.chat_template import chat_prompt
from fast.config import EngineConfig
from fast.entrypoints.openai_protocol import (
    ChatCompletionRequest, ChoiceDelta, CompletionRequest, OpenAIError, ResponseMeta, StreamedChoice,
    chat_chunk_choice, chat_params, chat_renames, chat_response, chat_role_choice, chunk, completion_chunk_choice,
    completion_params, completion_prompts, completion_renames, completion_response, parse_request, sse, usage,
    value_error,
)
from fast.entrypoints.server_metrics import ServerMetrics
from ref.outputs import RequestOutput
from ref.sampling_params import SamplingParams

if TYPE_CHECKING:  # fast.engine.llm_engine imports torch; only building a server needs it
    from fast.engine.llm_engine import LLMEngine

TINY_MODEL_NAME = "pagedlm-tiny"  # served name of the embedded model (no --model given)
DEFAULT_MAX_REQUEST_BODY_BYTES = 4 * 2**20  # ~1M token ids as JSON, or a very long text prompt
DEFAULT_MAX_PROMPTS_PER_REQUEST = 1024  # a 4 MiB body could otherwise hold ~1M one-token prompts


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """HTTP-side options of one app; each field is a `python -m fast.serve` flag (its help below)."""

    max_request_body_bytes: int = dataclasses.field(default=DEFAULT_MAX_REQUEST_BODY_BYTES, metadata={
        "help": "larger POST bodies are answered 413 without being read"})
    max_prompts_per_request: int = dataclasses.field(default=DEFAULT_MAX_PROMPTS_PER_REQUEST, metadata={
        "help": "a /v1/completions prompt list longer than this is a 400 (each prompt is an engine request)"})
    enable_docs: bool = dataclasses.field(default=False, metadata={
        "help": "serve /docs, /redoc and /openapi.json"})

    def __post_init__(self) -> None:
        for name in ("max_request_body_bytes", "max_prompts_per_request"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


# ---------------------------------------------------------------------------------- the app
def build_app(engine: LLMEngine | AsyncLLMEngine, served_model_name: str,
              config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under `served_model_name`, with `config`'s limits.

    `app.state.engine` is the AsyncLLMEngine, `app.state.metrics` the ServerMetrics.
    """
    config = ServerConfig() if config is None else config
    async_engine = engine if isinstance(engine, AsyncLLMEngine) else AsyncLLMEngine(engine)
    metrics = ServerMetrics(async_engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await async_engine.shutdown()

    docs = {} if config.enable_docs else dict(docs_url=None, redoc_url=None, openapi_url=None)
    app = FastAPI(title="pagedlm", lifespan=lifespan, **docs)
    app.state.engine, app.state.metrics = async_engine, metrics
    api = _Api(async_engine, served_model_name, config)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        if 400 <= exc.status < 499:  # 499: the client went away, nothing was rejected
            metrics.requests_rejected.inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return JSONResponse(_server_error(exc).body(), status_code=503)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await api.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await api.chat(request)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": served_model_name, "object": "model", "created": api.started, "owned_by": "pagedlm",
            "max_model_len": async_engine.engine.max_model_len,
        }]}

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.check_health():  # also sees a worker process that died while idle
            return JSONResponse(_server_error(async_engine.dead_error).body(), status_code=503)
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(await metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _server_error(exc: BaseException | None) -> OpenAIError:
    return OpenAIError(503, f"the engine failed: {exc!r}", type="internal_server_error")


@dataclasses.dataclass(frozen=True)
class _Call:
    """One API call: its engine requests (one per prompt) and what its responses share."""

    meta: ResponseMeta
    params: SamplingParams
    prompts: list[Any]
    priority: int
    stream: bool
    include_usage: bool

    def requests(self) -> list[NewRequest]:
        return [NewRequest(f"{self.meta.id}-{i}", p, self.params, self.priority)
                for i, p in enumerate(self.prompts)]

    def prompt_index(self, request_id: str) -> int:
        return int(request_id.rsplit("-", 1)[1])


class _Api:
    """The two generation endpoints: parse, check the model, queue, answer or stream."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str, config: ServerConfig):
        self.engine, self.model_name, self.config = engine, model_name, config
        self.started = int(time.time())

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise OpenAIError(404, f"The model `{model}` does not exist; this server serves "
                                   f"`{self.model_name}`", "model", code="model_not_found")

    async def completions(self, request: Request) -> Response:
        req = parse_request(CompletionRequest, await _json_body(request, self.config.max_request_body_bytes))
        self._check_model(req.model)
        params = completion_params(req)
        prompts = completion_prompts(req)
        if len(prompts) > self.config.max_prompts_per_request:
            raise OpenAIError(400, f"prompt must be at most {self.config.max_prompts_per_request} prompts "
                                   f"(--max-prompts-per-request), got {len(prompts)}", "prompt")
        call = self._call("cmpl", req, params, prompts)
        stream = await self._submit(call, completion_renames(req))
        if call.stream:
            return _sse_response(_stream_chunks(call, stream, "text_completion", completion_chunk_choice), stream)
        outputs = await _unless_disconnected(request, _finals(stream), stream)
        return JSONResponse(completion_response(call.meta, outputs))

    async def chat(self, request: Request) -> Response:
        req = parse_request(ChatCompletionRequest, await _json_body(request, self.config.max_request_body_bytes))
        self._check_model(req.model)
        params = chat_params(req)
        renames = chat_renames(req)
        messages = [{"role": m.role, "content": _message_text(m.content)} for m in req.messages]
        if not messages:
            raise OpenAIError(400, "messages must be a non-empty list", "messages")
        try:  # the tokenizer is shared with the step thread: use it between steps only
            prompt = await self.engine.between_steps_in_thread(chat_prompt, messages,
                                                               self.engine.engine.codec.tokenizer)
        except ValueError as e:
            raise value_error(e, renames) from None
        call = self._call("chatcmpl", req, params, [prompt])
        stream = await self._submit(call, renames)
        if call.stream:
            return _sse_response(_chat_chunks(call, stream), stream)
        outputs = await _unless_disconnected(request, _finals(stream), stream)
        return JSONResponse(chat_response(call.meta, outputs[0]))

    def _call(self, prefix: str, req, params: SamplingParams, prompts: list[Any]) -> _Call:
        meta = ResponseMeta(f"{prefix}-{uuid.uuid4().hex}", self.model_name, params.n, params.logprobs)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _Call(meta, params, prompts, req.priority or 0, bool(req.stream), include_usage)

    async def _submit(self, call: _Call, renames: dict) -> OutputStream:
        try:
            return await self.engine.add_requests(call.requests())
        except ValueError as e:
            raise value_error(e, renames) from None


async def _chat_chunks(call: _Call, stream: OutputStream) -> AsyncIterator[dict]:
    """The role chunk OpenAI sends first, then the content."""
    obj = "chat.completion.chunk"
    yield chunk(call.meta, obj, [chat_role_choice(i) for i in range(call.meta.n)], call.include_usage)
    async for c in _stream_chunks(call, stream, obj, lambda d: chat_chunk_choice(d, call.params.logprobs)):
        yield c


async def _stream_chunks(call: _Call, stream: OutputStream, obj: str,
                         format_choice: Callable[[ChoiceDelta], dict]) -> AsyncIterator[dict]:
    """One chunk per engine output that changed some choice; usage once every prompt finished.

    Without stream_options.include_usage the usage rides on the last content chunk; with it,
    on a final chunk with no choices (OpenAI's shape).
    """
    streamed: dict[int, StreamedChoice] = {}
    finals: dict[str, RequestOutput] = {}
    try:
        async for batch in stream:
            for out in batch:
                base = call.prompt_index(out.request_id) * call.meta.n
                deltas = []
                for c in out.outputs:
                    index = base + c.index
                    if index not in streamed:
                        streamed[index] = StreamedChoice(index, call.params)
                    d = streamed[index].delta(c)
                    if d is not None:
                        deltas.append(d)
                if out.finished:
                    finals[out.request_id] = out
                if deltas:
                    piece = chunk(call.meta, obj, [format_choice(d) for d in deltas], call.include_usage)
                    if len(finals) == len(call.prompts) and not call.include_usage:
                        piece["usage"] = usage(list(finals.values()))
                    yield piece
    except EngineDeadError as e:
        yield _server_error(e).body()
        return
    if call.include_usage:
        yield {**chunk(call.meta, obj, [], True), "usage": usage(list(finals.values()))}


def _message_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part.text for part in content)


async def _finals(stream: OutputStream) -> list[RequestOutput]:
    """The finished output of every request of the stream, in request order."""
    finals: dict[str, RequestOutput] = {}
    async with stream:
        async for batch in stream:
            finals.update((o.request_id, o) for o in batch if o.finished)
    return [finals[rid] for rid in stream.request_ids]


async def _json_body(request: Request, limit: int) -> bytes:
    """The body of a JSON POST, never holding more than `limit` bytes (plus one chunk) of it.

    415 unless the Content-Type is application/json (see the module docstring); 413 when the body
    is over `limit`: from Content-Length before reading anything, else by counting the chunks as
    they arrive. The unread rest is discarded by the server, not stored.
    """
    content_type = request.headers.get("content-type")
    if (content_type or "").split(";", 1)[0].strip().lower() != "application/json":
        raise OpenAIError(415, f"Content-Type must be application/json, got {content_type!r}",
                          code="unsupported_media_type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # the HTTP parser already rejected a malformed one
        raise _body_too_large(limit, f"{int(declared)} bytes")
    body = bytearray()
    try:
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise _body_too_large(limit, "more")
    except ClientDisconnect:
        raise OpenAIError(499, "client disconnected", type="client_disconnected") from None
    return bytes(body)


def _body_too_large(limit: int, got: str) -> OpenAIError:
    return OpenAIError(413, f"the request body must be at most {limit} bytes (--max-request-body-bytes), "
                            f"got {got}", code="request_too_large")


async def _unless_disconnected(request: Request, work, stream: OutputStream):
    """Await `work`, but abort the stream's requests (a 499) if the client disconnects first."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled (server shutdown)
        if not work_task.done():
            stream.close()  # the abort: the requests' blocks are free before the engine's next step
            work_task.cancel()
        watch_task.cancel()
        await asyncio.wait({work_task, watch_task})  # cancel() only asks; read them once they are done
        if not watch_task.cancelled():
            watch_task.exception()  # retrieved: a failed watch means no disconnect was seen
    if work_task.cancelled():
        raise OpenAIError(499, "client disconnected", type="client_disconnected")
    return work_task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _AbortingStreamingResponse(StreamingResponse):
    """A stream whose requests are aborted however it ends: done, client gone, or server error."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse_response(chunks: AsyncIterator[dict], stream: OutputStream) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        async for chunk in chunks:
            yield sse(chunk)
        yield sse("[DONE]")

    return _AbortingStreamingResponse(events(), stream.close)


# ---------------------------------------------------------------------------------- running it
@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                    startup_timeout_s: float = 60.0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread; yields the base URL ("http://host:port").

    port 0 picks a free port. On exit the server shuts down (aborting what is in flight). Its log
    records propagate to the root logger instead of uvicorn's own handlers.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # log_config=None: uvicorn's records go through the host's logging tree (tests can see them)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", log_config=None, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="pagedlm-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _dataclass_args(parser: argparse.ArgumentParser, title: str, cls: type) -> None:
    """One --flag per field of `cls` except `model`; unset flags are left out of the namespace, so
    the dataclass's own defaults apply (shown in --help)."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        doc = f.metadata.get("help")
        help_text = f"{doc} (default: {f.default})" if doc else f"default: {f.default}"
        if f.type in ("bool", bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            kind = int if "int" in str(f.type) else str
            group.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fast.serve", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None, help="HF checkpoint dir; None: the embedded tiny model")
    parser.add_argument("--served-model-name", default=None,
                        help=f"name clients pass as `model`; None: --model, or {TINY_MODEL_NAME!r}")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--log-level", default="info", help="uvicorn's log level")
    _dataclass_args(parser, "server options", ServerConfig)
    _dataclass_args(parser, "engine options (as fast.LLM)", EngineConfig)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = vars(parse_args(argv))
    import uvicorn

    from fast.engine.llm_engine import LLMEngine

    model, name = args.pop("model"), args.pop("served_model_name")
    host, port, log_level = args.pop("host"), args.pop("port"), args.pop("log_level")
    server = ServerConfig(**{f.name: args.pop(f.name) for f in dataclasses.fields(ServerConfig) if f.name in args})
    if model is None:
        from ref.models import tiny_checkpoint

        model, name = str(tiny_checkpoint()), name or TINY_MODEL_NAME
        print(f"Serving the embedded tiny model as {name!r}: its weights are random, so its text is "
              "gibberish (expected). Pass --model DIR to serve a real checkpoint.", flush=True)
    engine = LLMEngine(EngineConfig.from_options(model, args))
    uvicorn.run(build_app(engine, name or model, server), host=host, port=port, log_level=log_level)


if __name__ == "__main__":
    main()
