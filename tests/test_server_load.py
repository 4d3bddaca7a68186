"""A bounded load test on loopback: 200 concurrent streaming requests, about 20% abandoned mid-stream.

Afterwards every request that was not abandoned has completed, the KV pool is entirely free and
/metrics counts what was sent. No assertion on speed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fast import LLMEngine
from fast.config import EngineConfig
from fast.entrypoints.openai_server import build_app, serve_in_thread

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NUM_REQUESTS = 200
ABORT_FRACTION = 0.2
MAX_TOKENS = 8
OVERALL_TIMEOUT_S = 240.0  # a hang fails the test instead of stalling the suite
OPTIONS = dict(max_num_seqs=32, max_model_len=128, block_size=8, num_kv_blocks=200)
SHARED_PREFIX = list(range(100, 124))  # three full blocks: half the prompts hit the prefix cache


def prompt_for(rng: random.Random, i: int) -> list[int]:
    tail = [rng.randrange(3, 500) for _ in range(rng.randrange(1, 20))]
    return SHARED_PREFIX + tail if i % 2 else tail


async def one_request(client: httpx.AsyncClient, prompt: list[int], abandon_after: int | None, seed: int) -> dict:
    """Stream one completion; leave after `abandon_after` events if set. Returns what was seen."""
    body = {"model": "load", "prompt": prompt, "max_tokens": MAX_TOKENS, "stream": True, "seed": seed,
            "ignore_eos": True}
    seen = {"events": 0, "text": "", "finish": None, "usage": None, "done": False, "abandoned": False}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                seen["done"] = True
                break
            chunk = json.loads(line.removeprefix("data: "))
            seen["events"] += 1
            seen["text"] += chunk["choices"][0]["text"]
            seen["finish"] = chunk["choices"][0]["finish_reason"] or seen["finish"]
            seen["usage"] = chunk.get("usage") or seen["usage"]
            if abandon_after is not None and seen["events"] >= abandon_after:
                seen["abandoned"] = True
                break  # leaving the block closes the connection mid-stream
    return seen


def scrape(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {(s.name + str(sorted(s.labels.items())) if s.labels else s.name): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig.from_options(tiny_model_dir, OPTIONS))


def test_200_concurrent_streams_with_random_aborts(engine):
    rng = random.Random(0)
    prompts = [prompt_for(rng, i) for i in range(NUM_REQUESTS)]
    abandon = [rng.randrange(1, 4) if rng.random() < ABORT_FRACTION else None for _ in range(NUM_REQUESTS)]

    with serve_in_thread(build_app(engine, "load")) as url:
        async def main():
            limits = httpx.Limits(max_connections=NUM_REQUESTS + 10, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
                return await asyncio.gather(*(one_request(client, p, a, i)
                                              for i, (p, a) in enumerate(zip(prompts, abandon))))

        results = asyncio.run(asyncio.wait_for(main(), OVERALL_TIMEOUT_S))
        deadline = time.monotonic() + 30
        while engine.has_unfinished_requests():
            assert time.monotonic() < deadline, "abandoned requests were never aborted"
            time.sleep(0.05)
        m = scrape(url)

    completed = [r for r in results if not r["abandoned"]]
    abandoned = [r for r in results if r["abandoned"]]
    assert len(abandoned) > 0.1 * NUM_REQUESTS, "the test should abandon some streams"
    for i, r in enumerate(results):
        if not r["abandoned"]:
            assert r["done"] and r["finish"] == "length", f"request {i} did not complete: {r}"
            assert r["usage"]["completion_tokens"] == MAX_TOKENS
            assert r["usage"]["prompt_tokens"] == len(prompts[i])

    assert engine.kv.num_free_blocks == engine.num_blocks, "KV blocks leaked"
    engine.kv.check_invariants()
    assert m["pagedlm_kv_cache_usage_ratio"] == 0
    assert m["pagedlm_num_requests_running"] == 0 and m["pagedlm_num_requests_waiting"] == 0

    finished = {reason: m[f"pagedlm_requests_finished_total[('finish_reason', '{reason}')]"]
                for reason in ("stop", "length", "abort")}
    assert sum(finished.values()) == NUM_REQUESTS, finished
    assert finished["stop"] == 0
    # An abandoned stream may have finished on the server before it noticed the client left.
    assert len(completed) <= finished["length"] <= NUM_REQUESTS and finished["abort"] <= len(abandoned)
    assert m["pagedlm_prompt_tokens_total"] == sum(len(p) for p in prompts)
    assert m["pagedlm_requests_rejected_total"] == 0
    generated = m["pagedlm_generation_tokens_total"]
    assert finished["length"] * MAX_TOKENS <= generated <= NUM_REQUESTS * MAX_TOKENS
    assert m["pagedlm_time_to_first_token_seconds_count"] >= len(completed)
    assert m["pagedlm_time_per_output_token_seconds_count"] >= len(completed)
    assert m["pagedlm_prefix_cache_hit_rate"] > 0, "shared prefixes should have hit the cache"
