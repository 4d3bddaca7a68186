"""The OpenAI wire format: request bodies -> (prompts, SamplingParams), outputs -> response JSON.

Requests are parsed strictly (wrong JSON types and unknown fields are errors, as OpenAI does);
every error becomes an `OpenAIError` whose body names the offending field:

    {"error": {"message": ..., "type": "invalid_request_error", "param": <field>, "code": null}}

Sampling fields map one-to-one onto `SamplingParams` (OpenAI: max_tokens, temperature, top_p, n,
stop, seed, logprobs, presence_penalty, frequency_penalty, logit_bias; vLLM's extras: top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids, skip_special_tokens,
include_stop_str_in_output, allowed_token_ids, bad_words, truncate_prompt_tokens), so the server
samples exactly what `fast.LLM.generate` would. A JSON `null` means "the default". An error about
a field the client spelled differently names the client's spelling (chat's
`max_completion_tokens`, `top_logprobs`), down to the path inside a nested object
(`response_format.json_schema.schema`, `structured_outputs.regex`).

OpenAI's `logit_bias` keys token ids as strings ({"50256": -100}); each key must be the decimal
integer itself (no sign but "-", no leading zeros or spaces), so two keys never name one token.

A structured-output constraint (`SamplingParams.structured_outputs`) comes from exactly one of:

    response_format      {"type": "text"} (no constraint), {"type": "json_object"},
                         {"type": "json_schema", "json_schema": {"name", "schema", "description"?, "strict"?}}
    structured_outputs   vLLM's object: json | regex | choice | grammar | json_object, disable_any_whitespace
    guided_json, guided_regex, guided_choice, guided_grammar    vLLM's older fields, one kind each

Two of these at once is a 400 naming both. `guided_decoding_backend` may name "xgrammar" or
"auto" (the grammar engine here is xgrammar) and is otherwise a 400. An error about the
constraint (one that cannot be compiled, say) names the field the client used.

Legacy completions logprobs key `top_logprobs` by token text, and distinct tokens can decode to
the same text (every lone UTF-8 continuation byte decodes to U+FFFD). vLLM's
`_create_completion_logprobs` builds that dict from the text alone, so such tokens overwrite one
another and fewer than k entries come back, unless the client asks for
`return_tokens_as_token_ids`, which keys every token as "token_id:<id>". Here the k entries
always stay distinct: the chosen token keeps its text (so `top_logprobs[i][tokens[i]]` is
always `token_logprobs[i]`), then by rank each token keys by its text unless an earlier entry
already took that text, in which case it keys as "token_id:<id>" (vLLM's spelling of a token
without text). A token without text (no tokenizer) is "token_id:<id>" everywhere.
"""

from __future__ import annotations

import json
import re
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ref.outputs import CompletionOutput, Logprob, RequestOutput
from ref.sampling_params import SamplingParams, StructuredOutputsParams

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat: until max_model_len


class OpenAIError(Exception):
    """An error response: HTTP `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------- request bodies
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class JsonSchemaFormat(_Strict):
    """OpenAI's `response_format.json_schema`; `strict` is accepted (the output always follows the schema)."""

    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")  # alias: `schema` would shadow a BaseModel method
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None  # exactly when type is "json_schema"


class StructuredOutputsRequest(_Strict):
    """vLLM's `structured_outputs` body field: the fields of `StructuredOutputsParams`."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")  # alias: `json` would shadow a BaseModel method
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool | None = None


class _SamplingRequest(_Strict):
    """Fields shared by both endpoints; None = not given."""

    model: str | None = None  # None: the served model
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    priority: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    # structured output: at most one of these (module docstring)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = COMPLETIONS_DEFAULT_MAX_TOKENS  # null: until max_model_len (as vLLM)
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None  # None: until max_model_len
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None


# A union field's errors come one per alternative; say once what the field accepts instead.
_FIELD_SHAPES = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of token-id lists",
    "stop": "a string or a list of strings",
    "structured_outputs.json": "a JSON schema (an object, or its JSON text)",
    "guided_json": "a JSON schema (an object, or its JSON text)",
}


def parse_request(model_cls: type[_Strict], raw: bytes):
    """Validate a raw JSON body; an OpenAIError names the first bad field."""
    try:
        return model_cls.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = err["loc"]
        if err["type"] == "json_invalid":
            raise OpenAIError(400, f"malformed JSON body: {err['msg']}") from None
        if not loc:
            raise OpenAIError(400, f"the request body must be a JSON object: {err['msg']}") from None
        param = _error_param(model_cls, loc)
        if err["type"] == "extra_forbidden":
            raise OpenAIError(400, f"unrecognized request argument: {param}", param) from None
        if err["type"] == "missing":
            raise OpenAIError(400, f"{param} is required", param) from None
        shape = _FIELD_SHAPES.get(param)
        msg = f"Input should be {shape}" if shape else err["msg"]
        raise OpenAIError(400, f"{param}: {msg}, got {err.get('input')!r}", param) from None


def _error_param(model_cls: type[BaseModel], loc: tuple) -> str:
    """The field a validation error is about, as the client spelled it: `messages[i]` for a
    message, else the dotted path through the request's own objects (`response_format.json_schema.name`,
    or an unknown key such as `structured_outputs.whitespace_pattern`). The path stops where `loc`
    leaves them (a dict key, a list index, the name of a union member)."""
    if loc[0] == "messages" and len(loc) > 1 and isinstance(loc[1], int):
        return f"messages[{loc[1]}]"
    path: list[str] = []
    cls: type[BaseModel] | None = model_cls
    for part in loc:
        if cls is None:
            break
        path.append(str(part))  # a field of cls, or a key cls does not have (the error is about it)
        field = _field_by_alias(cls, part)
        cls = None if field is None else next(
            (t for t in (field.annotation, *typing.get_args(field.annotation))
             if isinstance(t, type) and issubclass(t, BaseModel)), None)
    return ".".join(path)


def _field_by_alias(cls: type[BaseModel], name) -> Any:
    return next((f for n, f in cls.model_fields.items() if (f.alias or n) == name), None)


def _or(value, default):
    return default if value is None else value


def _unsupported(req: BaseModel, name: str, ok: bool) -> None:
    if not ok:
        raise OpenAIError(400, f"{name} is not supported by this server, got {getattr(req, name)!r}", name)


def _common_params(req: _SamplingRequest) -> dict[str, Any]:
    if req.stream_options is not None and not req.stream:
        raise OpenAIError(400, "stream_options is only allowed when stream is true", "stream_options")
    return dict(
        n=_or(req.n, 1), temperature=_or(req.temperature, 1.0), top_p=_or(req.top_p, 1.0),
        top_k=_or(req.top_k, 0), min_p=_or(req.min_p, 0.0), seed=req.seed,
        presence_penalty=_or(req.presence_penalty, 0.0), frequency_penalty=_or(req.frequency_penalty, 0.0),
        repetition_penalty=_or(req.repetition_penalty, 1.0), stop=req.stop, stop_token_ids=req.stop_token_ids,
        ignore_eos=_or(req.ignore_eos, False), min_tokens=_or(req.min_tokens, 0),
        skip_special_tokens=_or(req.skip_special_tokens, True),
        include_stop_str_in_output=_or(req.include_stop_str_in_output, False),
        allowed_token_ids=req.allowed_token_ids, bad_words=req.bad_words, logit_bias=_logit_bias(req.logit_bias),
        truncate_prompt_tokens=req.truncate_prompt_tokens, structured_outputs=structured_outputs(req),
    )


_TOKEN_ID_KEY = re.compile(r"0|-?[1-9][0-9]{0,18}")  # a token id's decimal spelling, one per integer


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's {"<token id>": bias} as {token_id: bias}; SamplingParams checks ids and biases."""
    if raw is None:
        return None
    for key in raw:
        if not _TOKEN_ID_KEY.fullmatch(key):
            raise OpenAIError(400, f"logit_bias must be keyed by token ids (decimal integers as strings, "
                                   f"e.g. \"50256\"), got key {key!r}", "logit_bias")
    return {int(key): bias for key, bias in raw.items()}


# ---------------------------------------------------------------------------------- constraints
_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}  # vLLM's older fields -> StructuredOutputsParams' kind
GRAMMAR_BACKENDS = ("xgrammar", "auto")  # guided_decoding_backend values this server accepts


def _constraint_sources(req: _SamplingRequest) -> list[str]:
    """The request fields that set a structured-output constraint, in declaration order."""
    sources = []
    if req.response_format is not None and req.response_format.type != "text":
        sources.append("response_format")
    if req.structured_outputs is not None:
        sources.append("structured_outputs")
    return sources + [name for name in _GUIDED_FIELDS if getattr(req, name) is not None]


def structured_outputs(req: _SamplingRequest) -> StructuredOutputsParams | None:
    """The request's constraint as StructuredOutputsParams (None: unconstrained); an OpenAIError
    names the field the client used."""
    backend = req.guided_decoding_backend
    if backend is not None and backend not in GRAMMAR_BACKENDS:
        raise OpenAIError(400, f"guided_decoding_backend must be one of {', '.join(map(repr, GRAMMAR_BACKENDS))} "
                               f"(this server's grammar engine is xgrammar), got {backend!r}",
                          "guided_decoding_backend")
    sources = _constraint_sources(req)
    if len(sources) > 1:
        raise OpenAIError(400, f"only one structured-output constraint may be given, got {' and '.join(sources)}",
                          sources[0])
    if not sources:
        return None
    source = sources[0]
    if source == "response_format":
        fields = _response_format_constraint(req.response_format)
    elif source == "structured_outputs":
        so = req.structured_outputs
        fields = {name: value for name, value in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                                  ("grammar", so.grammar), ("json_object", so.json_object),
                                                  ("disable_any_whitespace", so.disable_any_whitespace))
                  if value is not None}
    else:
        fields = {_GUIDED_FIELDS[source]: getattr(req, source)}
    try:
        return StructuredOutputsParams(**fields)
    except ValueError as e:
        raise value_error(e, constraint_renames(req)) from None


def _response_format_constraint(rf: ResponseFormat) -> dict[str, Any]:
    if rf.type != "json_schema":
        if rf.json_schema is not None:
            raise OpenAIError(400, f"response_format.json_schema is only allowed when response_format.type is "
                                   f"'json_schema', got type {rf.type!r}", "response_format.json_schema")
        return {"json_object": True}
    if rf.json_schema is None:
        raise OpenAIError(400, "response_format.json_schema is required when response_format.type is "
                               "'json_schema'", "response_format.json_schema")
    return {"json": rf.json_schema.schema_}


def constraint_renames(req: _SamplingRequest) -> dict[str, str]:
    """StructuredOutputsParams' error names ("structured_outputs.json cannot be compiled") -> the
    request field the constraint came from."""
    sources = _constraint_sources(req)
    source = sources[0] if sources else "structured_outputs"
    if source == "structured_outputs":
        return {}
    if source == "response_format":
        kind, field = (("json", "response_format.json_schema.schema") if req.response_format.type == "json_schema"
                       else ("json_object", "response_format"))
    else:
        kind, field = _GUIDED_FIELDS[source], source
    return {"structured_outputs": field, f"structured_outputs.{kind}": field}


def _make_params(fields: dict[str, Any], renames: dict[str, str]) -> SamplingParams:
    try:
        return SamplingParams(**fields)
    except ValueError as e:
        raise value_error(e, renames) from None


def completion_params(req: CompletionRequest) -> SamplingParams:
    _unsupported(req, "echo", not req.echo)
    _unsupported(req, "suffix", req.suffix is None)
    n = _or(req.n, 1)
    if req.best_of is not None and req.best_of != n:
        raise OpenAIError(400, f"best_of must be None or equal to n ({n}), got {req.best_of}", "best_of")
    return _make_params({**_common_params(req), "max_tokens": req.max_tokens, "logprobs": req.logprobs},
                        completion_renames(req))


def chat_params(req: ChatCompletionRequest) -> SamplingParams:
    if req.top_logprobs is not None and not req.logprobs:
        raise OpenAIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
    logprobs = _or(req.top_logprobs, 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return _make_params({**_common_params(req), "max_tokens": max_tokens, "logprobs": logprobs}, chat_renames(req))


def completion_renames(req: CompletionRequest) -> dict[str, str | None]:
    """COMPLETION_RENAMES, plus the constraint's field (constraint_renames)."""
    return {**COMPLETION_RENAMES, **constraint_renames(req)}


def chat_renames(req: ChatCompletionRequest) -> dict[str, str | None]:
    """CHAT_RENAMES, plus max_tokens -> max_completion_tokens when that is what the client sent, plus
    the constraint's field (constraint_renames)."""
    renames = {**CHAT_RENAMES, **constraint_renames(req)}
    if req.max_completion_tokens is not None:
        renames["max_tokens"] = "max_completion_tokens"
    return renames


def completion_prompts(req: CompletionRequest) -> list[str | dict]:
    """Engine prompts: a string, or {"prompt_token_ids": [...]}; a list gives one prompt each."""
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if p and isinstance(p[0], list):
        return [{"prompt_token_ids": ids} for ids in p]
    if p and isinstance(p[0], str):
        return list(p)
    return [{"prompt_token_ids": list(p)}]


# Engine/SamplingParams field names -> the request field a client should fix.
COMPLETION_RENAMES = {"prompt_token_ids": "prompt", "sampling_params": None, "request_id": None}
CHAT_RENAMES = {"prompt": "messages", "prompt_token_ids": "messages", "logprobs": "top_logprobs",
                "sampling_params": None, "request_id": None}
_LEADING_NAME = re.compile(r"^([a-z_]+(?:\.[a-z_]+)*)")  # "top_k", "structured_outputs.json"


def value_error(e: ValueError, renames: dict[str, str | None]) -> OpenAIError:
    """A ValueError from SamplingParams / the engine ("<field> must be ...") as a 400.

    A renamed sampling field is renamed in the message too ("logprobs must be" becomes
    "top_logprobs must be", "structured_outputs.regex cannot be" becomes "guided_regex cannot
    be"); engine names (prompt_token_ids -> messages) only change `param`, since their messages
    describe the engine's view ("prompt length must be ...").
    """
    msg = str(e)
    m = _LEADING_NAME.match(msg)
    name = m.group(1) if m else None
    head = name.split(".")[0] if name else None
    param = renames.get(name, name) if name in renames or head in _REQUEST_FIELDS else None
    if param is not None and param != name and head in _SAMPLING_FIELDS:
        msg = param + msg[len(name):]
    return OpenAIError(400, msg, param)


_REQUEST_FIELDS = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
_SAMPLING_FIELDS = set(SamplingParams.__dataclass_fields__)


# ---------------------------------------------------------------------------------- responses
def usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _token_str(token_id: int, lp: Logprob) -> str:
    return lp.decoded_token if lp.decoded_token is not None else f"token_id:{token_id}"


def _by_rank(entry: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    return sorted(entry.items(), key=lambda kv: kv[1].rank)


def completion_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], text_offset: int = 0) -> dict:
    """OpenAI's legacy shape; text_offset counts characters from the start of the completion."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tid, entry in zip(token_ids, entries):
        tok = _token_str(tid, entry[tid])
        out["tokens"].append(tok)
        out["token_logprobs"].append(entry[tid].logprob)
        out["top_logprobs"].append(_distinct_top_logprobs(tid, entry))
        out["text_offset"].append(text_offset)
        text_offset += len(tok)
    return out


def _distinct_top_logprobs(chosen: int, entry: dict[int, Logprob]) -> dict[str, float]:
    """{key: logprob} in rank order, one key per token of `entry` (see the module docstring): the
    chosen token under its text; any other under its text unless the chosen token or a better
    ranked one has it, else "token_id:<id>"."""
    chosen_text = _token_str(chosen, entry[chosen])
    top: dict[str, float] = {}
    for t, lp in _by_rank(entry):
        key = _token_str(t, lp)
        if key in top or (key == chosen_text and t != chosen):
            key = f"token_id:{t}"
        top[key] = lp.logprob
    return top


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], top_k: int) -> dict:
    """{"content": [{token, logprob, bytes, top_logprobs: the top_k by rank}]}."""
    def item(t: int, lp: Logprob) -> dict:
        tok = _token_str(t, lp)
        return {"token": tok, "logprob": lp.logprob, "bytes": list(tok.encode("utf-8"))}

    content = []
    for tid, entry in zip(token_ids, entries):
        top = [item(t, lp) for t, lp in _by_rank(entry) if lp.rank <= top_k]
        content.append({**item(tid, entry[tid]), "top_logprobs": top})
    return {"content": content}


@dataclass(frozen=True)
class ResponseMeta:
    """What every response object of one API call shares."""

    id: str
    model: str
    n: int
    logprobs: int | None  # the SamplingParams.logprobs asked for
    created: int = field(default_factory=lambda: int(time.time()))


def completion_response(meta: ResponseMeta, outputs: list[RequestOutput]) -> dict:
    choices = []
    for i, out in enumerate(outputs):
        for c in out.outputs:
            lps = completion_logprobs(c.token_ids, c.logprobs) if c.logprobs is not None else None
            choices.append({"index": i * meta.n + c.index, "text": c.text, "logprobs": lps,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": choices, "usage": usage(outputs)}


def chat_response(meta: ResponseMeta, output: RequestOutput) -> dict:
    choices = []
    for c in output.outputs:
        lps = chat_logprobs(c.token_ids, c.logprobs, meta.logprobs) if c.logprobs is not None else None
        choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": lps, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    return {"id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
            "choices": choices, "usage": usage([output])}


# ---------------------------------------------------------------------------------- streaming
@dataclass(frozen=True)
class ChoiceDelta:
    """What one choice adds in a stream chunk."""

    index: int
    text: str
    token_ids: list[int]  # tokens new since the previous chunk of this choice
    logprobs: list[dict[int, Logprob]] | None  # theirs; None when not asked for
    text_offset: int  # characters of the logprob tokens already sent (legacy completions logprobs)
    finish_reason: str | None
    stop_reason: int | str | None


class StreamedChoice:
    """What one choice has sent so far in a stream, and the next safe delta.

    A running output's text is not final: its last characters may be an incomplete UTF-8
    character (decoded as U+FFFD) or the start of a stop string that will be cut off. So until the
    choice finishes, the delta stops short of
        - trailing U+FFFD characters,
        - the last (longest stop string - 1) characters, when stop strings are set,
    and, while fewer than `min_tokens` tokens exist (stop strings are not checked yet, so a later
    check may cut anywhere), no text is sent at all. The concatenated deltas then equal the final
    `text` exactly.
    """

    def __init__(self, index: int, params: SamplingParams):
        self.index = index
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        self._min_tokens = params.min_tokens if params.stop else 0
        self.text = ""  # sent so far
        self.num_tokens = 0  # tokens covered by the chunks sent so far
        self.text_offset = 0
        self.done = False

    def next_text(self, c: CompletionOutput) -> str:
        """The text delta that is safe to send now (and mark it sent)."""
        if c.finish_reason is not None:
            target = c.text
        elif len(c.token_ids) < self._min_tokens:
            target = self.text
        else:
            target = c.text[: len(c.text) - self._hold] if self._hold else c.text
            target = target.rstrip("\ufffd")
        if not target.startswith(self.text):  # cannot unsend; see the class docstring
            return ""
        delta = target[len(self.text):]
        self.text = target
        return delta

    def delta(self, c: CompletionOutput) -> ChoiceDelta | None:
        """The next chunk's part for this choice; None when there is nothing to send."""
        if self.done:
            return None
        text = self.next_text(c)
        ids = c.token_ids[self.num_tokens:]
        lps = c.logprobs[self.num_tokens:] if c.logprobs is not None else None
        if not text and c.finish_reason is None and not (lps and ids):
            return None
        d = ChoiceDelta(self.index, text, ids, lps, self.text_offset, c.finish_reason, c.stop_reason)
        if lps is not None:
            self.text_offset += sum(len(_token_str(t, e[t])) for t, e in zip(ids, lps))
        self.num_tokens, self.done = len(c.token_ids), c.finish_reason is not None
        return d


def completion_chunk_choice(d: ChoiceDelta) -> dict:
    lps = completion_logprobs(d.token_ids, d.logprobs, d.text_offset) if d.logprobs is not None else None
    return {"index": d.index, "text": d.text, "logprobs": lps, "finish_reason": d.finish_reason,
            "stop_reason": d.stop_reason}


def chat_chunk_choice(d: ChoiceDelta, top_logprobs: int | None) -> dict:
    lps = chat_logprobs(d.token_ids, d.logprobs, top_logprobs) if d.logprobs is not None else None
    delta = {"content": d.text} if d.text or d.finish_reason is None else {}
    return {"index": d.index, "delta": delta, "logprobs": lps, "finish_reason": d.finish_reason,
            "stop_reason": d.stop_reason}


def chat_role_choice(index: int) -> dict:
    """The first chunk of a chat choice, as OpenAI sends it."""
    return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def chunk(meta: ResponseMeta, obj: str, choices: list[dict], include_usage: bool) -> dict:
    """A stream chunk; with include_usage every chunk has "usage" (null until the last), as OpenAI."""
    out = {"id": meta.id, "object": obj, "created": meta.created, "model": meta.model, "choices": choices}
    if include_usage:
        out["usage"] = None
    return out


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
