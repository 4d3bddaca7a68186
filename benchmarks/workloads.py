"""The standard benchmark workloads, defined once and seeded (README "Performance").

- offline:       ~30M-param Llama (hidden 512, 8 layers, 8 q / 2 kv heads, vocab 8192, fp32),
                 64 requests, prompts uniform 16-256 tokens, outputs 16-128, greedy, ignore_eos.
- shared-prefix: 32 requests sharing a 384-token system prompt + 16-64 own tokens, 32 out.
- long-context:  4 requests with prompts near max_model_len (1024), 32 out.
- memory:        a fixed KV budget; how many requests run at once, and how full the KV slots are.

`scale="smoke"` shrinks every workload (CI proves the benchmarks run, not their speed).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ref.models import tiny_checkpoint
from ref.sampling_params import SamplingParams

BENCH_MODEL = dict(
    vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
)
SMOKE_MODEL = dict(BENCH_MODEL, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512)


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]
    max_tokens: list[int]
    max_model_len: int = 1024

    @property
    def params(self) -> list[SamplingParams]:
        return [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in self.max_tokens]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.max_tokens)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def model_dir(scale: str = "full") -> str:
    overrides = SMOKE_MODEL if scale == "smoke" else BENCH_MODEL
    return str(tiny_checkpoint("llama", seed=0, tokenizer=False, **overrides))


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def offline(scale: str = "full") -> Workload:
    rng = random.Random(0)
    n, (lo, hi), (olo, ohi), vocab = (64, (16, 256), (16, 128), 8192) if scale == "full" else (6, (4, 24), (2, 6), 512)
    return Workload("offline", [_tokens(rng, rng.randint(lo, hi), vocab) for _ in range(n)],
                    [rng.randint(olo, ohi) for _ in range(n)])


def shared_prefix(scale: str = "full") -> Workload:
    rng = random.Random(1)
    n, prefix_len, (lo, hi), out, vocab = (32, 384, (16, 64), 32, 8192) if scale == "full" else (4, 32, (2, 6), 2, 512)
    system = _tokens(rng, prefix_len, vocab)
    return Workload("shared-prefix", [system + _tokens(rng, rng.randint(lo, hi), vocab) for _ in range(n)], [out] * n)


def long_context(scale: str = "full") -> Workload:
    rng = random.Random(2)
    n, (lo, hi), out, vocab = (4, (900, 990), 32, 8192) if scale == "full" else (2, (100, 120), 2, 512)
    return Workload("long-context", [_tokens(rng, rng.randint(lo, hi), vocab) for _ in range(n)], [out] * n)


def memory(scale: str = "full") -> Workload:
    rng = random.Random(3)
    n, (lo, hi), (olo, ohi), vocab = (64, (16, 256), (16, 128), 8192) if scale == "full" else (6, (4, 24), (2, 6), 512)
    return Workload("memory", [_tokens(rng, rng.randint(lo, hi), vocab) for _ in range(n)],
                    [rng.randint(olo, ohi) for _ in range(n)])


WORKLOADS = {"offline": offline, "shared-prefix": shared_prefix, "long-context": long_context, "memory": memory}


# ----------------------------------------------------------------------------- structured output
#
# The constraints of the structured-output benchmarks (benchmarks/grammar_engines.py picks the
# grammar library on them; benchmarks/bench_structured.py runs the offline workload under them).

STRUCTURED_SCHEMA = {  # a typical extraction schema: 5 properties, a range, an enum, an array
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "status": {"enum": ["active", "inactive", "pending"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "status", "tags", "score"],
    "additionalProperties": False,
}
STRUCTURED_REGEX = r"[a-z][a-z0-9._]+@[a-z]+\.(com|org|net)"  # an e-mail address
# The same with bounded repetitions: a broad character class repeated {m,n} times is the case
# where xgrammar's mask cost grows with the vocabulary (grammar_engines.py measures both).
STRUCTURED_REGEX_BOUNDED = r"[a-z][a-z0-9._]{2,15}@[a-z]{3,10}\.(com|org|net)"
STRUCTURED_CHOICE = ["positive", "negative", "neutral", "mixed"]


def structured_model_dir(scale: str = "full") -> str:
    """The benchmark model of `scale` with the embedded tokenizer (a constraint is over text).
    The tokenizer is the byte-level BPE `ref.models` trains on its small corpus: at vocab 8192 it
    has 685 tokens, the other ids have no text (a grammar never allows them)."""
    overrides = SMOKE_MODEL if scale == "smoke" else BENCH_MODEL
    return str(tiny_checkpoint("llama", seed=0, tokenizer=True, **overrides))
