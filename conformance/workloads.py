"""Hypothesis strategies for random serving workloads, shared by the tests and the CLI tiers.

A workload is a list of requests (prompt, SamplingParams, priority) with shared prefixes so
that prefix caching gets hits, a mix of greedy and seeded sampling, stops, penalties, logprobs
and n > 1, plus aborts scheduled at given steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

from ref.sampling_params import SamplingParams

STOP_STRINGS = ["e", " t", "a", "in", ".", "\n"]


@dataclass
class Workload:
    prompts: list[dict]
    params: list[SamplingParams]
    priorities: list[int]
    aborts: dict[int, list[int]] = field(default_factory=dict)  # step -> request indices

    @property
    def aborted(self) -> set[int]:
        return {i for ids in self.aborts.values() for i in ids}


# Where a request meets the model's length limit: prompt + max_tokens minus max_model_len, or a
# prompt of exactly max_model_len ("full") or one less ("full-1").
LIMIT_KINDS = ("at", "below", "above", "full", "full-1")


@st.composite
def sampling_params_strategy(draw, max_tokens: int = 16, vocab: int = 512, allow_stop_strings: bool = True,
                             fixed_max_tokens: int | None = None):
    if fixed_max_tokens is None:
        # max_tokens = 1 (a prefill that also ends the request) often, else uniform.
        fixed_max_tokens = draw(st.sampled_from([1, None, None, None])) or draw(st.integers(1, max_tokens))
    kw = dict(max_tokens=fixed_max_tokens, ignore_eos=draw(st.booleans()))
    if draw(st.booleans()):
        kw.update(repetition_penalty=draw(st.sampled_from([1.0, 1.2, 0.8])),
                  presence_penalty=draw(st.sampled_from([0.0, 0.5, -0.5])),
                  frequency_penalty=draw(st.sampled_from([0.0, 0.3])))
    if draw(st.integers(0, 3)) == 0:
        kw["logprobs"] = draw(st.integers(0, 4))
    if draw(st.integers(0, 5)) == 0:
        kw["prompt_logprobs"] = draw(st.integers(0, 3))
    if draw(st.integers(0, 3)) == 0:
        kw["stop_token_ids"] = draw(st.lists(st.integers(3, vocab - 1), min_size=1, max_size=3))
    if allow_stop_strings and draw(st.integers(0, 3)) == 0:
        kw["stop"] = draw(st.lists(st.sampled_from(STOP_STRINGS), min_size=1, max_size=2))
        kw["include_stop_str_in_output"] = draw(st.booleans())
    if draw(st.integers(0, 3)) == 0:  # min_tokens == max_tokens (stops masked to the end) often
        kw["min_tokens"] = draw(st.sampled_from([kw["max_tokens"], None])) or draw(st.integers(0, kw["max_tokens"]))
    if draw(st.booleans()):
        return SamplingParams(temperature=0.0, **kw)
    return SamplingParams(
        temperature=draw(st.sampled_from([0.6, 1.0, 1.5])),
        top_p=draw(st.sampled_from([1.0, 0.9, 0.5])),
        top_k=draw(st.sampled_from([0, 1, 5, 50])),
        min_p=draw(st.sampled_from([0.0, 0.1])),
        seed=draw(st.integers(0, 2**32)),
        n=draw(st.sampled_from([1, 1, 2, 3])),
        **kw,
    )


@st.composite
def workloads(draw, vocab: int = 512, max_requests: int = 40, max_prompt_len: int = 80,
              max_tokens: int = 16, max_abort_step: int = 30, allow_stop_strings: bool = True,
              max_model_len: int | None = None):
    """With `max_model_len`, about one request in four sits on the length limit (`LIMIT_KINDS`):
    prompt + max_tokens at, one below or one above it, or a prompt of exactly max_model_len
    (one token) or one less."""
    token = st.integers(3, vocab - 1)

    def tokens(lo: int, hi: int) -> list[int]:
        n = draw(st.integers(lo, hi))  # lengths drawn uniformly, not Hypothesis' short-list bias
        return draw(st.lists(token, min_size=n, max_size=n))

    prefixes = [tokens(1, max_prompt_len // 2) for _ in range(draw(st.integers(1, 3)))]
    num = draw(st.integers(1, max_requests))
    prompts, params, priorities = [], [], []
    for _ in range(num):
        prefix = draw(st.sampled_from([[], *prefixes]))
        limit = draw(st.sampled_from([None, None, None, *LIMIT_KINDS])) if max_model_len else None
        if limit is None:
            tail = tokens(0 if prefix else 1, max_prompt_len - len(prefix))
            fixed = None
        else:
            length, fixed = _at_limit(draw, limit, max_model_len, max_tokens)
            prefix = prefix[:length]
            tail = draw(st.lists(token, min_size=length - len(prefix), max_size=length - len(prefix)))
        prompts.append({"prompt_token_ids": prefix + tail})
        params.append(draw(sampling_params_strategy(max_tokens, vocab, allow_stop_strings, fixed)))
        priorities.append(draw(st.integers(0, 3)))
    aborts: dict[int, list[int]] = {}
    for i in draw(st.lists(st.integers(0, num - 1), max_size=min(num, 4), unique=True)):
        # Half the aborts in the first few steps, while the request most likely runs and holds
        # KV blocks; the rest anywhere (before it starts, mid-way, after it finished).
        early = draw(st.booleans())
        aborts.setdefault(draw(st.integers(1, min(6, max_abort_step)) if early else st.integers(0, max_abort_step)),
                          []).append(i)
    return Workload(prompts, params, priorities, aborts)


def _at_limit(draw, kind: str, max_model_len: int, max_tokens: int) -> tuple[int, int]:
    """(prompt length, max_tokens) of a request on the length limit."""
    if kind == "full":
        return max_model_len, draw(st.integers(1, max_tokens))
    if kind == "full-1":
        return max_model_len - 1, draw(st.integers(1, max_tokens))
    new = draw(st.integers(2, max_tokens)) if max_tokens >= 2 else 1
    total = max_model_len + {"at": 0, "below": -1, "above": 1}[kind]
    return min(total - new, max_model_len), new


@st.composite
def fast_engine_options(draw, max_model_len: int = 128, variants: bool = False,
                        backends: tuple[str, ...] = ("torch", "triton"),
                        policies: tuple[str, ...] = ("fcfs", "priority")):
    """Small pools and budgets that force chunking and preemption. With `variants`, the attention
    backend is drawn: "torch" most of the time, each other of `backends` one example in six.
    `policy` is drawn from `policies`: built-in names, or `module:attr` (the adapter imports it)."""
    block_size = draw(st.sampled_from([4, 8, 16, 32]))
    needed = -(-max_model_len // block_size)
    max_num_seqs = draw(st.integers(1, 8))
    # A quarter of the examples without chunked prefill: a whole prompt per step, so the budget
    # must hold max_model_len tokens.
    chunked = draw(st.integers(0, 3)) > 0
    budget = draw(st.integers(max(max_num_seqs, 8), 96)) if chunked else draw(st.integers(max_model_len, 2 * max_model_len))
    return dict(
        max_model_len=max_model_len,
        block_size=block_size,
        # Half the time the smallest legal pool: one max-length request, so preemption is common.
        num_kv_blocks=needed if draw(st.booleans()) else draw(st.integers(needed, 3 * needed)),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        enable_chunked_prefill=chunked,
        enable_prefix_caching=draw(st.integers(0, 3)) > 0,  # on 3 times in 4: prefix hits are common
        long_prefill_token_threshold=draw(st.sampled_from([0, 0, 7, 32])) if chunked else 0,
        policy=draw(st.sampled_from(list(policies))),
        # variants: an example in six on each other backend, and one in six each in float16 and
        # bfloat16 (the oracle then runs in that dtype too, and the comparison takes its tolerance;
        # a sampled token near a top-k/top-p/min-p cut is judged by compare's near-cut clause).
        **(dict(attention_backend=draw(st.sampled_from(
                    ["torch"] * (6 - len([b for b in backends if b != "torch"])) + [b for b in backends if b != "torch"])),
                dtype=draw(st.sampled_from(E2E_DTYPES))) if variants else {}),
    )


# The e2e tier's engine dtypes, float32 most of the time.
E2E_DTYPES = ("float32",) * 4 + ("float16", "bfloat16")
