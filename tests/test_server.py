"""The OpenAI-compatible server, started for real on a loopback port.

Generation goes through the official `openai` client (completions and chat, streaming or not)
and must equal `fast.LLM.generate` on the same prompts and params; errors, disconnects and
metrics go through raw HTTP.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest
from hypothesis import given, note, strategies as st
from prometheus_client.parser import text_string_to_metric_families

from fast import LLM, CompletionOutput, LLMEngine, SamplingParams
from fast.entrypoints.chat_template import render_default
from fast.config import EngineConfig
from fast.entrypoints.openai_protocol import StreamedChoice, completion_logprobs
from fast.entrypoints.openai_server import ServerConfig, build_app, serve_in_thread
from ref.outputs import Logprob
from ref.sequence import Sequence, StopContext
from ref.tokenizer import TextCodec, load_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

OPTIONS = dict(max_num_seqs=16, max_model_len=512, num_kv_blocks=160)
MODEL = "tiny-test"
WAIT_S = 10.0  # bound on "soon" for aborts to reach the engine

# (OpenAI request fields, the SamplingParams they must mean). Prompts stay shorter than one
# block, so no request can hit blocks another test cached: each call computes as it would alone.
CASES = [
    (dict(temperature=0, max_tokens=12), SamplingParams(temperature=0, max_tokens=12)),
    (dict(temperature=0.8, top_p=0.9, seed=7, max_tokens=10, logprobs=3),
     SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=10, logprobs=3)),
    (dict(temperature=1.0, seed=1, n=2, max_tokens=14, stop=[" the", "e"], presence_penalty=0.5,
          frequency_penalty=0.3, extra_body=dict(top_k=20, min_p=0.02, repetition_penalty=1.1)),
     SamplingParams(temperature=1.0, seed=1, n=2, max_tokens=14, stop=[" the", "e"], presence_penalty=0.5,
                    frequency_penalty=0.3, top_k=20, min_p=0.02, repetition_penalty=1.1)),
    (dict(temperature=0.7, seed=3, max_tokens=9, extra_body=dict(ignore_eos=True, min_tokens=4)),
     SamplingParams(temperature=0.7, seed=3, max_tokens=9, ignore_eos=True, min_tokens=4)),
]
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig.from_options(tiny_model_dir, OPTIONS))


@pytest.fixture(scope="module")
def server(engine):
    """Base URL of a live server over `engine`."""
    with serve_in_thread(build_app(engine, MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def oracle(tiny_model_dir):
    return LLM(tiny_model_dir, **OPTIONS)


def expect(oracle: LLM, prompt, params: SamplingParams):
    return oracle.generate(prompt, params, use_tqdm=False)[0]


def metrics(http: httpx.Client) -> dict[str, float]:
    """Every sample of /metrics as {"name{label=value,...}": value}."""
    out = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_engine_idle(engine: LLMEngine, free_blocks: int, within_s: float = WAIT_S) -> None:
    """Within `within_s` the engine has no requests and `free_blocks` free blocks (as before a test)."""
    deadline = time.monotonic() + within_s
    while engine.has_unfinished_requests() or engine.kv.num_free_blocks != free_blocks:
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle after {within_s}s: unfinished="
                                 f"{engine.get_num_unfinished_requests()}, free blocks "
                                 f"{engine.kv.num_free_blocks}, expected {free_blocks}")
        time.sleep(0.02)


def check_legacy_logprobs(lp, expected_completion, k: int) -> None:
    assert lp.token_logprobs == [e[t].logprob for t, e in zip(expected_completion.token_ids,
                                                              expected_completion.logprobs)]
    for j, (top, entry, tok, tok_lp) in enumerate(zip(lp.top_logprobs, expected_completion.logprobs, lp.tokens,
                                                      lp.token_logprobs)):
        # one key per token: its text, or "token_id:<id>" where another token has that text
        assert len(top) == len(entry) <= k + 1, f"position {j}: {len(top)} keys for {len(entry)} tokens"
        for key, value in top.items():
            ids = [int(key[len("token_id:"):])] if key.startswith("token_id:") else \
                [t for t, x in entry.items() if x.decoded_token == key]
            assert value in [entry[t].logprob for t in ids], f"position {j}: {key!r} -> {value}"
        assert top[tok] == tok_lp, f"position {j}: the chosen token's key holds another token's logprob"
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_legacy_top_logprobs_keep_tokens_with_the_same_text_apart():
    """Three byte tokens that each decode to U+FFFD, and the chosen one is ranked third: all four
    tokens keep an entry, and the chosen token's text maps to its own logprob."""
    entry = {7: Logprob(-0.5, 1, "\ufffd"), 8: Logprob(-1.0, 2, "\ufffd"), 9: Logprob(-2.0, 3, "a"),
             10: Logprob(-3.0, 4, "\ufffd")}
    lp = completion_logprobs([10], [entry])
    assert lp["tokens"] == ["\ufffd"] and lp["token_logprobs"] == [-3.0]
    assert lp["top_logprobs"] == [{"token_id:7": -0.5, "token_id:8": -1.0, "a": -2.0, "\ufffd": -3.0}]
    assert list(lp["top_logprobs"][0].values()) == [-0.5, -1.0, -2.0, -3.0], "rank order"
    chosen_first = completion_logprobs([7], [entry])["top_logprobs"][0]
    assert chosen_first == {"\ufffd": -0.5, "token_id:8": -1.0, "a": -2.0, "token_id:10": -3.0}


# ---------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("case", range(len(CASES)))
def test_completion_equals_llm(client, oracle, case):
    fields, params = CASES[case]
    resp = client.completions.create(model=MODEL, prompt=PROMPT, **fields)
    exp = expect(oracle, PROMPT, params)
    assert [c.index for c in resp.choices] == list(range(params.n))
    for choice, e in zip(resp.choices, exp.outputs):
        assert (choice.text, choice.finish_reason) == (e.text, e.finish_reason), f"choice {choice.index}"
        if params.logprobs is not None:
            check_legacy_logprobs(choice.logprobs, e, params.logprobs)
    completion_tokens = sum(len(e.token_ids) for e in exp.outputs)
    assert resp.usage.prompt_tokens == len(exp.prompt_token_ids)
    assert resp.usage.completion_tokens == completion_tokens
    assert resp.usage.total_tokens == len(exp.prompt_token_ids) + completion_tokens


@pytest.mark.parametrize("case", range(len(CASES)))
def test_streamed_completion_equals_llm(client, oracle, case):
    """The concatenated deltas are exactly the final text (no half characters, no stop-string
    prefixes sent too early); the last chunk of each choice carries its finish reason."""
    fields, params = CASES[case]
    texts = [""] * params.n
    finish = [None] * params.n
    usage = None
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, stream=True, **fields):
        for c in chunk.choices:
            assert finish[c.index] is None, f"choice {c.index}: text after its finish_reason"
            texts[c.index] += c.text
            finish[c.index] = c.finish_reason
        usage = chunk.usage or usage
    exp = expect(oracle, PROMPT, params)
    assert texts == [e.text for e in exp.outputs]
    assert finish == [e.finish_reason for e in exp.outputs]
    assert usage.completion_tokens == sum(len(e.token_ids) for e in exp.outputs)


def test_token_id_and_batched_prompts(client, oracle):
    """A list of prompts (text or token ids) gives n choices per prompt, indexed prompt * n + i."""
    params = SamplingParams(temperature=0.9, seed=5, n=2, max_tokens=6)
    ids = [[5, 6, 7, 8], [40, 41, 42]]
    resp = client.completions.create(model=MODEL, prompt=ids, temperature=0.9, seed=5, n=2, max_tokens=6)
    exp = oracle.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert [c.text for c in resp.choices] == [c.text for e in exp for c in e.outputs]
    assert resp.usage.prompt_tokens == 7
    texts = ["The quick brown fox", "Numbers: 0 1 2"]
    resp = client.completions.create(model=MODEL, prompt=texts, temperature=0.9, seed=5, n=2, max_tokens=6)
    exp = oracle.generate(texts, params, use_tqdm=False)
    assert [c.text for c in resp.choices] == [c.text for e in exp for c in e.outputs]


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"}]


def test_chat_equals_llm_on_the_default_template(client, oracle):
    prompt = render_default(CHAT)
    assert prompt == "<|system|>\nYou are terse.\n<|user|>\nHello!\n<|assistant|>\n"
    params = SamplingParams(temperature=0.8, seed=9, n=2, max_tokens=10, logprobs=2)
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0.8, seed=9, n=2,
                                          max_tokens=10, logprobs=True, top_logprobs=2)
    exp = expect(oracle, prompt, params)
    for choice, e in zip(resp.choices, exp.outputs):
        assert choice.message.role == "assistant"
        assert (choice.message.content, choice.finish_reason) == (e.text, e.finish_reason)
        lps = choice.logprobs.content
        assert [x.logprob for x in lps] == [lp[t].logprob for t, lp in zip(e.token_ids, e.logprobs)]
        assert all(len(x.top_logprobs) == 2 for x in lps)
        assert all(x.top_logprobs[0].logprob >= x.top_logprobs[1].logprob for x in lps)
    assert resp.usage.prompt_tokens == len(exp.prompt_token_ids)
    assert resp.usage.completion_tokens == sum(len(e.token_ids) for e in exp.outputs)


def test_streamed_chat_equals_llm(client, oracle):
    params = SamplingParams(temperature=0.6, seed=2, max_tokens=12, stop=["a"])
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0.6, seed=2, max_tokens=12,
                                                 stop=["a"], stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    exp = expect(oracle, render_default(CHAT), params)
    assert (text, finish) == (exp.outputs[0].text, [exp.outputs[0].finish_reason])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(exp.outputs[0].token_ids)
    assert all(c.usage is None for c in chunks[:-1]), "with include_usage, only the last chunk has usage"


def test_raw_stream_is_server_sent_events_ending_in_done(http):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 3


def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http.get("/health").status_code == 200


# ---------------------------------------------------------------------------------- stream deltas
@pytest.fixture(scope="module")
def codec(tiny_model_dir):
    return TextCodec(load_tokenizer(tiny_model_dir))


@given(token_ids=st.lists(st.integers(0, 511), min_size=1, max_size=24),
       stop=st.lists(st.sampled_from(["e", "an", " the", "ed", "in", "aye", "\ufffd"]), max_size=2),
       min_tokens=st.integers(0, 4), include_stop=st.booleans())
def test_stream_deltas_add_up_to_the_final_text(codec, token_ids, stop, min_tokens, include_stop):
    """Any token sequence through the real stop rules: the deltas sent while it runs never have
    to be taken back (half UTF-8 characters, stop-string prefixes, cuts before min_tokens)."""
    params = SamplingParams(stop=stop, min_tokens=min(min_tokens, len(token_ids)), max_tokens=len(token_ids),
                            include_stop_str_in_output=include_stop, seed=0)
    seq = Sequence(0, params, None)
    ctx = StopContext(eos_token_ids=(2,), max_model_len=1024, codec=codec)
    streamed, sent = StreamedChoice(0, params), ""
    for t in token_ids:
        seq.append(t, 3, ctx)
        sent += streamed.next_text(seq.to_output())
        note(f"after {t}: text={seq.text!r} sent={sent!r}")
        if seq.finished:
            break
    assert sent == seq.text


def test_stream_deltas_hold_back_a_possible_stop_string():
    params = SamplingParams(stop=["cde"])
    streamed = StreamedChoice(0, params)
    running = lambda text: CompletionOutput(0, text, [0] * len(text), None, None)  # noqa: E731
    assert streamed.next_text(running("abc")) == "a"  # "bc" may start "cde"
    assert streamed.next_text(running("abcd")) == "b"
    assert streamed.next_text(CompletionOutput(0, "ab", [0] * 5, None, None, "stop", "cde")) == ""
    streamed = StreamedChoice(0, SamplingParams())
    assert streamed.next_text(running("x\ufffd")) == "x"  # an unfinished UTF-8 character waits
    assert streamed.next_text(running("x\u00e9")) == "\u00e9"


# ---------------------------------------------------------------------------------- bad input
BAD = [
    # (endpoint, raw body, status, param)
    ("/v1/completions", b'{"prompt": "x", ', 400, None),
    ("/v1/completions", b'["not", "an", "object"]', 400, None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "n": 2, "temperature": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 3}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "min_p": 1.5}, 400, "min_p"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "ignore_eos": "yes"}, 400, "ignore_eos"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": 7}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 100000]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5] * 513}, 400, "prompt"),  # longer than max_model_len
    ("/v1/completions", {"prompt": ["fine", ""]}, 400, "prompt"),  # one bad prompt rejects the call
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 600}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
]


@pytest.mark.parametrize("endpoint,body,status,param", BAD, ids=[f"{b[0][4:]}:{b[3]}:{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_an_openai_error_naming_the_field(http, engine, endpoint, body, status, param):
    before = metrics(http)["pagedlm_requests_rejected_total"]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(endpoint, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"], err
    if status == 404:
        assert err["code"] == "model_not_found"
    assert not engine.has_unfinished_requests(), "a rejected call queued something"
    assert metrics(http)["pagedlm_requests_rejected_total"] == before + 1
    ok = http.post("/v1/completions", json={"prompt": "still serving", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200, "the server stopped serving after a bad request"


def test_chat_errors_name_the_field_the_client_sent(http):
    """max_completion_tokens and max_tokens are one SamplingParams field: the error names the one sent."""
    messages = [{"role": "user", "content": "x"}]
    for field in ("max_completion_tokens", "max_tokens"):
        r = http.post("/v1/chat/completions", json={"messages": messages, field: -1})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == field and err["message"].startswith(f"{field} must"), err
    r = http.post("/v1/chat/completions", json={"messages": messages, "logprobs": True, "top_logprobs": 21})
    assert r.json()["error"]["message"].startswith("top_logprobs must"), r.text


def test_openai_client_sees_bad_requests_as_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)


# ---------------------------------------------------------------------------------- disconnects
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def server_log(server):
    """WARNING+ records of the server and the root logger during the test (uvicorn's logger is
    attached directly, as its config may keep it from propagating)."""
    handler = _Records()
    loggers = [logging.getLogger("uvicorn.error"), logging.getLogger()]
    for lg in loggers:
        lg.addHandler(handler)
    yield handler.records
    for lg in loggers:
        lg.removeHandler(handler)


def logged(records: list[logging.LogRecord]) -> list[str]:
    return [f"{r.name}: {r.getMessage()} {r.exc_info[1]!r}" if r.exc_info else f"{r.name}: {r.getMessage()}"
            for r in records]


def test_client_disconnect_mid_stream_aborts(server, http, engine, server_log):
    free_blocks = engine.kv.num_free_blocks
    before = metrics(http)['pagedlm_requests_finished_total{finish_reason=abort}']
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "stream": True, "temperature": 0,
            "ignore_eos": True}
    with httpx.Client(base_url=server, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert engine.has_unfinished_requests()
    # the connection is closed here, long before 400 tokens
    wait_engine_idle(engine, free_blocks)
    assert metrics(http)['pagedlm_requests_finished_total{finish_reason=abort}'] == before + 1
    assert not logged(server_log)


def test_client_disconnect_while_waiting_for_a_full_response_aborts(server, http, engine, server_log):
    free_blocks = engine.kv.num_free_blocks
    before = metrics(http)['pagedlm_requests_finished_total{finish_reason=abort}']
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 500, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    wait_engine_idle(engine, free_blocks)
    assert metrics(http)['pagedlm_requests_finished_total{finish_reason=abort}'] == before + 1
    time.sleep(0.1)  # the handler's last steps after the abort (where the error used to be raised)
    assert not logged(server_log), "the handler failed after the client left"


# ---------------------------------------------------------------------------------- metrics
def test_metrics_count_what_was_served(client, http, engine):
    before = metrics(http)
    n_requests, max_tokens = 3, 5
    prompt_tokens = 0
    for i in range(n_requests):
        resp = client.completions.create(model=MODEL, prompt=f"count {i}", max_tokens=max_tokens, seed=i,
                                         extra_body={"ignore_eos": True})
        prompt_tokens += resp.usage.prompt_tokens
    after = metrics(http)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["pagedlm_requests_finished_total{finish_reason=length}"] == n_requests
    assert delta["pagedlm_prompt_tokens_total"] == prompt_tokens
    assert delta["pagedlm_generation_tokens_total"] == n_requests * max_tokens
    assert delta["pagedlm_time_to_first_token_seconds_count"] == n_requests
    assert delta["pagedlm_time_per_output_token_seconds_count"] == n_requests
    assert after["pagedlm_num_requests_running"] == 0 and after["pagedlm_num_requests_waiting"] == 0
    assert after["pagedlm_kv_cache_blocks{state=free}"] == before["pagedlm_kv_cache_blocks{state=free}"]
    assert after["pagedlm_kv_cache_blocks{state=total}"] == engine.num_blocks
    assert after["pagedlm_kv_cache_usage_ratio"] == pytest.approx(
        1 - after["pagedlm_kv_cache_blocks{state=free}"] / engine.num_blocks)
    for name in ("pagedlm_prefix_cache_hit_rate", "pagedlm_num_preemptions_total"):
        assert name in after


def test_two_apps_in_one_process_have_separate_registries(engine):
    a, b = build_app(engine, "a"), build_app(engine, "b")
    assert a.state.metrics.registry is not b.state.metrics.registry


# ---------------------------------------------------------------------------------- pieces
def test_docs_are_off_unless_enabled(engine):
    from starlette.testclient import TestClient

    for config, status in ((None, 404), (ServerConfig(enable_docs=True), 200)):
        client = TestClient(build_app(engine, "docs", config))
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == status, (config, path)


def test_server_config_is_validated():
    with pytest.raises(ValueError, match="^max_request_body_bytes must be"):
        ServerConfig(max_request_body_bytes=0)
    with pytest.raises(ValueError, match="^max_prompts_per_request must be"):
        ServerConfig(max_prompts_per_request=True)


def test_help_shows_every_default_without_importing_torch():
    """`--help` is what a newcomer runs first: fast, and every flag says what it defaults to."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "fast.entrypoints.openai_server", "--help"],
                         capture_output=True, text=True, timeout=120, check=True)
    options = re.split(r"\n  (?=-)", out.stdout.split("options:", 1)[1])[1:]
    assert len(options) > len(EngineConfig.__dataclass_fields__), out.stdout
    for text in options:
        if not text.startswith("-h, --help"):
            assert "default" in text, f"no default shown for: {text.strip()}"
    imported = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported, "--help imported torch"


def test_cli_flags_are_the_engine_options(tiny_model_dir):
    from fast.entrypoints.openai_server import parse_args

    server = vars(parse_args(["--max-request-body-bytes", "1000", "--max-prompts-per-request", "3", "--enable-docs"]))
    fields = {k: server[k] for k in ServerConfig.__dataclass_fields__}
    assert ServerConfig(**fields) == ServerConfig(max_request_body_bytes=1000, max_prompts_per_request=3,
                                                  enable_docs=True)
    args = vars(parse_args(["--port", "9", "--max-num-seqs", "4", "--no-enable-prefix-caching", "--dtype",
                            "float32"]))
    assert (args.pop("port"), args.pop("model"), args.pop("host")) == (9, None, "127.0.0.1")
    for key in ("served_model_name", "log_level"):
        args.pop(key)
    assert args == {"max_num_seqs": 4, "enable_prefix_caching": False, "dtype": "float32"}
    EngineConfig.from_options(tiny_model_dir, args)  # every flag is an engine option


def test_chat_uses_the_tokenizers_template_when_it_has_one():
    from fast.entrypoints.chat_template import chat_prompt

    class TemplatedTokenizer:
        chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}[assistant]"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "<s>" + "".join(f"[{m['role']}]{m['content']}" for m in messages) + "[assistant]"

        def encode(self, text, add_special_tokens=True):
            assert not add_special_tokens, "the template wrote the special tokens itself"
            return [ord(ch) for ch in text]

    prompt = chat_prompt(CHAT, TemplatedTokenizer())
    assert prompt["prompt"] == "<s>[system]You are terse.[user]Hello![assistant]"
    assert prompt["prompt_token_ids"] == [ord(ch) for ch in prompt["prompt"]]
    assert chat_prompt(CHAT, object()) == render_default(CHAT)  # no chat_template attribute
    with pytest.raises(ValueError, match="^messages: "):
        chat_prompt(CHAT, None)
