"""Per-token cost of detokenization + stop rules, by output length: the oracle's full decode vs
fast's incremental `StopChecker`.

For each output length L in OUTPUT_LENGTHS, one timed call handles output tokens L - BLOCK + 1 .. L
of a sample whose two stop strings never occur (so every step searches); the cost per token is
the call's time / BLOCK (amortized over the window's commits):
- `full`: `ref.sequence.check_stop(ids[:k], ...)` for each of those k, what fast did before (and
  the oracle still does): decode all k ids, search the whole text. Grows with L.
- `incremental`: `StopChecker.append` of those tokens, on a checker that already holds the first
  L - BLOCK (built in the untimed setup). Flat in L: O(1) amortized.
The tokens are the embedded tiny model's tokenizer on English text with accents and emoji (byte
tokens that split multi-byte characters among them). `extra_info`: output_len, path, and (when
timed) us_per_token (from the median call). Run: `.venv/bin/python -m pytest benchmarks/bench_detokenize.py -p no:xdist`
(--benchmark-disable only checks that they run).
"""

from __future__ import annotations

import pytest

from fast.core.detokenizer import StopChecker
from ref.models import CORPUS
from ref.sampling_params import SamplingParams
from ref.sequence import StopContext, check_stop
from ref.tokenizer import TextCodec, load_tokenizer

OUTPUT_LENGTHS = (64, 512, 4096)
PROMPT_LEN = 32
PARAMS = SamplingParams(stop=["<never>", "STOP HERE"], max_tokens=None, ignore_eos=True)
BLOCK = 32  # tokens per timed call
ROUNDS = 20


@pytest.fixture(scope="module")
def stream(tiny_model_dir):
    """(StopContext, output ids of at least max(OUTPUT_LENGTHS) tokens)."""
    codec = TextCodec(load_tokenizer(tiny_model_dir))
    ids: list[int] = []
    while len(ids) < max(OUTPUT_LENGTHS):
        ids += codec.encode(CORPUS + " naïve café 😀 ")
    ctx = StopContext(eos_token_ids=(2,), max_model_len=PROMPT_LEN + len(ids) + 1, codec=codec)
    return ctx, ids


def _record(benchmark, output_len: int, path: str) -> None:
    benchmark.extra_info.update(output_len=output_len, path=path)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["us_per_token"] = benchmark.stats.stats.median / BLOCK * 1e6


@pytest.mark.parametrize("output_len", OUTPUT_LENGTHS)
def test_full_decode_per_token(benchmark, stream, output_len):
    """The oracle's rule, re-run from scratch for each of the last BLOCK tokens up to L."""
    benchmark.group = "detokenize: per-token cost"
    ctx, ids = stream

    def last_tokens() -> list:
        return [check_stop(ids[:k], PARAMS, PROMPT_LEN, ctx)[1] for k in range(output_len - BLOCK + 1, output_len + 1)]

    assert benchmark.pedantic(last_tokens, rounds=ROUNDS, iterations=1) == [None] * BLOCK
    _record(benchmark, output_len, "full")


@pytest.mark.parametrize("output_len", OUTPUT_LENGTHS)
def test_incremental_per_token(benchmark, stream, output_len):
    """fast's checker, appending the last BLOCK tokens up to L to the L - BLOCK it holds."""
    benchmark.group = "detokenize: per-token cost"
    ctx, ids = stream

    def setup():
        checker = StopChecker(PARAMS, PROMPT_LEN, ctx)
        for t in ids[:output_len - BLOCK]:
            checker.append(t)
        return (checker,), {}

    def last_tokens(checker: StopChecker) -> list:
        return [checker.append(t)[0] for t in ids[output_len - BLOCK:output_len]]

    assert benchmark.pedantic(last_tokens, setup=setup, rounds=ROUNDS, iterations=1) == [None] * BLOCK
    _record(benchmark, output_len, "incremental")


def test_incremental_text_equals_full_decode(stream):
    """The benchmarked stream itself: the incremental text is the full decode at the end."""
    ctx, ids = stream
    checker = StopChecker(PARAMS, PROMPT_LEN, ctx)
    for t in ids:
        assert checker.append(t) == (None, None)
    assert checker.text == ctx.codec.decode(ids)
    assert checker.detokenizer.num_full_decodes == 0
