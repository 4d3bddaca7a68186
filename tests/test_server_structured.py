"""The server's token controls and structured output (SPEC §3 "Token controls and constraints",
§6 "Structured output"; the fields are listed in fast/entrypoints/openai_protocol.py).

First the mapping from request JSON to `SamplingParams` (every source of a constraint, logit_bias
keys, the vLLM extras), then the 400s, each naming the field the client sent, then generation
through the real `openai` client: a constrained output that finished with "stop" validates with an
independent validator (`jsonschema`, `json.loads`, choice membership, `re.fullmatch`), streaming
and not. The embedded model's weights are random: the seeds below were chosen so that its outputs
finish within max_tokens (the tests check finish_reason before validating).
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from fast import LLMEngine
from fast.config import EngineConfig
from fast.entrypoints.openai_protocol import (
    ChatCompletionRequest, CompletionRequest, chat_params, completion_params, parse_request,
)
from fast.entrypoints.openai_server import build_app, serve_in_thread
from ref.sampling_params import StructuredOutputsParams
from tests.test_server import OPTIONS, wait_engine_idle

MODEL = "tiny-structured"

MESSAGES = [{"role": "user", "content": "Describe the sky as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["color", "ok", "n"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "sky", "schema": SCHEMA, "strict": True}}
# Any whitespace is allowed between JSON tokens (as vLLM), and the random model uses plenty of it:
# a generous max_tokens, and a seed whose output ends within it (printed by the asserts otherwise).
JSON_MAX_TOKENS = 96
JSON_SEED = 0


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig.from_options(tiny_model_dir, OPTIONS))


@pytest.fixture(scope="module")
def server(engine):
    with serve_in_thread(build_app(engine, MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


@pytest.fixture(autouse=True)
def idle_after(request):
    """Every test that talks to the server leaves the engine idle with the blocks it found free."""
    if "server" not in request.fixturenames:
        yield
        return
    engine = request.getfixturevalue("engine")
    free = engine.kv.num_free_blocks
    yield
    wait_engine_idle(engine, free)


def params_of(body: dict, chat: bool = True):
    """The SamplingParams a request body means (no server: the protocol layer alone)."""
    if chat:
        return chat_params(parse_request(ChatCompletionRequest, json.dumps({"messages": MESSAGES, **body}).encode()))
    return completion_params(parse_request(CompletionRequest, json.dumps({"prompt": "x", **body}).encode()))


# ---------------------------------------------------------------------------------- the mapping
MAPPING = [
    # (extra request fields, the StructuredOutputsParams they must mean)
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
    ({"response_format": JSON_SCHEMA_FORMAT}, StructuredOutputsParams(json=SCHEMA)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "description": "d", "schema": {}}}},
     StructuredOutputsParams(json={})),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
     StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)),
    ({"structured_outputs": {"json": '{"type": "integer"}'}}, StructuredOutputsParams(json='{"type": "integer"}')),
    ({"structured_outputs": {"regex": "[ab]+"}}, StructuredOutputsParams(regex="[ab]+")),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, StructuredOutputsParams(choice=["yes", "no"])),
    ({"structured_outputs": {"grammar": 'root ::= "a"'}}, StructuredOutputsParams(grammar='root ::= "a"')),
    ({"structured_outputs": {"json_object": True}}, StructuredOutputsParams(json_object=True)),
    ({"guided_json": SCHEMA}, StructuredOutputsParams(json=SCHEMA)),
    ({"guided_regex": "[ab]+", "guided_decoding_backend": "xgrammar"}, StructuredOutputsParams(regex="[ab]+")),
    ({"guided_choice": ["yes", "no"], "guided_decoding_backend": "auto"},
     StructuredOutputsParams(choice=["yes", "no"])),
    ({"guided_grammar": 'root ::= "a"'}, StructuredOutputsParams(grammar='root ::= "a"')),
    ({"response_format": {"type": "text"}, "guided_regex": "a"}, StructuredOutputsParams(regex="a")),
    ({"guided_decoding_backend": "xgrammar"}, None),
]


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
@pytest.mark.parametrize("body,expected", MAPPING, ids=[",".join(b) for b, _ in MAPPING])
def test_each_constraint_source_means_one_structured_outputs(body, expected, chat):
    assert params_of(body, chat).structured_outputs == expected


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_token_controls_pass_through(chat):
    """OpenAI's logit_bias keys are token ids as strings; vLLM's extras are SamplingParams' own."""
    p = params_of({"logit_bias": {"5": 2.5, "0": -100, "17": 100}, "allowed_token_ids": [3, 5],
                   "bad_words": ["sky", " blue"], "truncate_prompt_tokens": 7}, chat)
    assert p.logit_bias == {5: 2.5, 0: -100.0, 17: 100.0}
    assert (p.allowed_token_ids, p.bad_words, p.truncate_prompt_tokens) == ([3, 5], ["sky", " blue"], 7)
    p = params_of({}, chat)
    assert (p.logit_bias, p.allowed_token_ids, p.bad_words, p.truncate_prompt_tokens, p.structured_outputs) == \
        (None, None, None, None, None)


# ---------------------------------------------------------------------------------- bad requests
def rf_schema(schema) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


BAD = [
    # (extra request fields, the param the 400 names, text its message must contain)
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "response_format.json_schema.name", "required"),
    (rf_schema(5), "response_format.json_schema.schema", "object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}}},
     "response_format.json_schema.extra", "unrecognized"),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "x", "schema": {}}}},
     "response_format.json_schema", "only allowed"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
    ({"response_format": "json"}, "response_format", ""),
    ({**rf_schema(SCHEMA), "guided_regex": "a"}, "response_format", "response_format and guided_regex"),
    ({"structured_outputs": {"regex": "a"}, "guided_choice": ["a"]}, "structured_outputs",
     "structured_outputs and guided_choice"),
    ({"guided_json": SCHEMA, "guided_grammar": 'root ::= "a"'}, "guided_json", "guided_json and guided_grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern", "unrecognized"),
    ({"structured_outputs": {"json": 5}}, "structured_outputs.json", "JSON schema"),
    ({"guided_choice": []}, "guided_choice", "guided_choice must be"),
    ({"guided_choice": ["a", ""]}, "guided_choice", "guided_choice must be"),
    ({"guided_regex": ""}, "guided_regex", "guided_regex must be"),
    ({"guided_json": "{not json"}, "guided_json", "guided_json must be"),
    ({"guided_decoding_backend": "outlines", "guided_regex": "a"}, "guided_decoding_backend", "xgrammar"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "unrecognized"),
    ({"logit_bias": {"a": 1}}, "logit_bias", "'a'"),
    ({"logit_bias": {"05": 1}}, "logit_bias", "'05'"),
    ({"logit_bias": {"-1": 1}}, "logit_bias", ">= 0"),
    ({"logit_bias": {"5": 100.5}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"5": "up"}}, "logit_bias", ""),
    ({"allowed_token_ids": []}, "allowed_token_ids", "non-empty"),
    ({"bad_words": [" "]}, "bad_words", "non-space"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens", ">= 1"),
    # the engine's checks (add_request), named for the client
    ({"logit_bias": {"100000": 1}}, "logit_bias", "vocab"),
    ({"allowed_token_ids": [100000]}, "allowed_token_ids", "vocab"),
    ({"guided_regex": "("}, "guided_regex", "guided_regex cannot be compiled"),
    ({"guided_regex": "a" * 70_000}, "guided_regex", "65536"),
    ({"guided_grammar": 'rot ::= "a"'}, "guided_grammar", "guided_grammar cannot be compiled"),
    ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs.grammar",
     "structured_outputs.grammar cannot be compiled"),
    (rf_schema({"type": "frob"}), "response_format.json_schema.schema",
     "response_format.json_schema.schema cannot be compiled"),
]


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("body,param,text", BAD, ids=[f"{p}:{i}" for i, (_, p, _) in enumerate(BAD)])
def test_bad_constraints_and_token_controls_are_400s_naming_the_field(http, engine, endpoint, body, param, text):
    base = {"messages": MESSAGES} if endpoint == "/v1/chat/completions" else {"prompt": "x"}
    r = http.post(endpoint, json={**base, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["type"]) == (param, "invalid_request_error"), err
    assert text in err["message"], err
    assert not engine.has_unfinished_requests(), "a rejected call queued something"


def test_openai_client_sees_a_bad_schema_as_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": {"type": "frob"}}})
    assert e.value.body["param"] == "response_format.json_schema.schema"


# ---------------------------------------------------------------------------------- generation
def check_finished(finish_reason: str, text: str) -> None:
    assert finish_reason == "stop", f"stopped for {finish_reason!r} before the constraint was complete " \
                                    f"(pick another seed or a larger max_tokens): {text!r}"


def test_chat_json_schema_validates(client):
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=JSON_SEED, max_tokens=JSON_MAX_TOKENS,
                                          response_format=JSON_SCHEMA_FORMAT)
    choice = resp.choices[0]
    check_finished(choice.finish_reason, choice.message.content)
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_streamed_chat_json_schema_validates_and_equals_the_full_response(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=JSON_SEED,
                                                 max_tokens=JSON_MAX_TOKENS, response_format=JSON_SCHEMA_FORMAT,
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1, finish
    check_finished(finish[0], text)
    jsonschema.validate(json.loads(text), SCHEMA)
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=JSON_SEED,
                                          max_tokens=JSON_MAX_TOKENS, response_format=JSON_SCHEMA_FORMAT)
    assert text == full.choices[0].message.content


def test_json_object_is_an_object(client):
    """(The random model rarely closes a string it opened: this seed's object ends early.)"""
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=13, max_tokens=64,
                                          response_format={"type": "json_object"})
    choice = resp.choices[0]
    check_finished(choice.finish_reason, choice.message.content)
    assert isinstance(json.loads(choice.message.content), dict)


CHOICES = ["sunny", "cloudy with rain", "snow"]


@pytest.mark.parametrize("field", ["guided_choice", "structured_outputs"])
def test_choice_is_one_of_the_choices(client, field):
    extra = {"guided_choice": CHOICES} if field == "guided_choice" else {"structured_outputs": {"choice": CHOICES}}
    for seed in range(3):
        resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=seed, max_tokens=16,
                                              extra_body=extra)
        choice = resp.choices[0]
        check_finished(choice.finish_reason, choice.message.content)
        assert choice.message.content in CHOICES


REGEX = r"[a-c]{2,4}-[0-9]{1,2}"


def test_regex_matches_in_full_streaming_and_not(client):
    """Through /v1/completions (vLLM's extra field), and the chat stream."""
    resp = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=16,
                                     extra_body={"guided_regex": REGEX})
    check_finished(resp.choices[0].finish_reason, resp.choices[0].text)
    assert re.fullmatch(REGEX, resp.choices[0].text), resp.choices[0].text
    chunks = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=3, max_tokens=16, stream=True,
                                            extra_body={"structured_outputs": {"regex": REGEX}})
    pieces = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) for c in chunks if c.choices]
    text = "".join(p for p, _ in pieces)
    check_finished(pieces[-1][1], text)
    assert re.fullmatch(REGEX, text), text


def steer_token(engine) -> tuple[int, str]:
    """A token with visible text, and the text of four of it."""
    tok = engine.codec.encode(" sky", add_special_tokens=False)[-1]
    return tok, engine.codec.decode([tok] * 4)


@pytest.mark.parametrize("how", ["logit_bias", "allowed_token_ids"])
def test_logit_bias_and_allowed_token_ids_steer_greedy_output(client, engine, how):
    tok, steered = steer_token(engine)
    args = dict(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=4)
    plain = client.completions.create(**args).choices[0].text
    assert plain != steered, "the token must be one greedy decoding would not pick anyway"
    extra = {"logit_bias": {str(tok): 100}} if how == "logit_bias" else {"extra_body": {"allowed_token_ids": [tok]}}
    assert client.completions.create(**args, **extra).choices[0].text == steered
    text = "".join(c.choices[0].text for c in client.completions.create(**args, **extra, stream=True) if c.choices)
    assert text == steered


def test_truncate_prompt_tokens_keeps_the_last_tokens(http):
    ids = list(range(5, 55))
    r = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 2, "temperature": 0,
                                           "truncate_prompt_tokens": 5})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 5
    same = http.post("/v1/completions", json={"prompt": ids[-5:], "max_tokens": 2, "temperature": 0})
    assert r.json()["choices"][0]["text"] == same.json()["choices"][0]["text"]


def test_truncate_prompt_tokens_applies_before_the_max_model_len_check(http):
    r = http.post("/v1/completions", json={"prompt": [5] * 600, "max_tokens": 2, "truncate_prompt_tokens": 5})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 5
