"""SPEC's output rules checked on an output by themselves, independently of `ref/`.

`fast` imports the stop rules, detokenization, input checks and output records from `ref/`
(they are the contract, not an optimization), so comparing `fast` with `ref` cannot find a bug
in them: it changes both sides alike. This module re-derives what SPEC §5/§6 say a finished
output must look like, from the request alone, with its own code: the text comes from the
`tokenizers` library directly (not `ref.tokenizer`), the stop rules are re-implemented here by
brute force over every prefix. Run it on the oracle's outputs and the engine's alike.

    check_output_contract(request, output, rules) -> None, or AssertionError naming the
    request, the sample, the token index and the rule.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ref.sampling_params import SamplingParams

Decode = Callable[[list[int], bool], str]  # (token_ids, skip_special_tokens) -> text


@dataclass(frozen=True)
class ModelRules:
    """What the rules need to know of the model: vocabulary, EOS ids, length limit, decoder."""

    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    decode: Decode | None  # None: the model has no tokenizer, so every text is ""

    @classmethod
    def from_checkpoint(cls, model_dir: str, max_model_len: int | None = None) -> "ModelRules":
        """Read config.json and tokenizer.json with no code from `ref/`."""
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        eos = cfg.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        limit = max_model_len or cfg["max_position_embeddings"]
        tok_file = Path(model_dir) / "tokenizer.json"
        decode = None
        if tok_file.is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tok_file))
            decode = lambda ids, skip: tok.decode(ids, skip_special_tokens=skip)  # noqa: E731
        return cls(cfg["vocab_size"], eos_ids, limit, decode)


def _text(rules: ModelRules, ids: list[int], params: SamplingParams) -> str:
    if rules.decode is None or not ids:
        return ""
    return rules.decode(list(ids), params.skip_special_tokens)


def _earliest_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """Brute force: the first position where any stop string starts; ties go to the first listed."""
    for pos in range(len(text)):
        for s in stops:
            if text.startswith(s, pos):
                return pos, s
    return None


def check_output_contract(prompt_token_ids: list[int], params: SamplingParams, output,
                          rules: ModelRules, label: str = "request") -> None:
    """Every SPEC rule a finished, non-aborted RequestOutput must satisfy on its own."""
    assert output.finished, f"{label}: output not finished"
    assert list(output.prompt_token_ids) == list(prompt_token_ids), (
        f"{label}: prompt_token_ids {list(output.prompt_token_ids)[:8]}... are not the request's")
    indices = [c.index for c in output.outputs]
    assert indices == list(range(params.n)), f"{label}: sample indices {indices}, want 0..{params.n - 1}"
    _check_prompt_logprobs(prompt_token_ids, params, output, rules, label)
    eos = tuple(rules.eos_token_ids)
    for c in output.outputs:
        check = _check_rule0_sample if ended_by_rule0(params, c, eos) else _check_sample
        check(prompt_token_ids, params, c, rules, f"{label} sample {c.index}")


def ended_by_rule0(params: SamplingParams, completion, eos_token_ids: tuple[int, ...]) -> bool:
    """Finished with "stop" and no stop_reason, but not by a stop token (SPEC §5 rule 1): no token
    was left to sample (rule 0)."""
    if completion.finish_reason != "stop" or completion.stop_reason is not None:
        return False
    ids = completion.token_ids
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
    return not (ids and len(ids) >= params.min_tokens and ids[-1] in stop_ids)


def _check_rule0_sample(prompt: list[int], p: SamplingParams, c, rules, label: str) -> None:
    ids = list(c.token_ids)
    n = len(ids)
    assert p.structured_outputs is not None or p.allowed_token_ids is not None, (
        f"{label}: finished 'stop' with no stop token or string ({n} tokens, ending {ids[-4:]}), and no "
        f"structured_outputs or allowed_token_ids that could leave no token to sample (SPEC §5 rule 0)")
    limit = p.max_tokens if p.max_tokens is not None else rules.max_model_len
    assert n < limit and len(prompt) + n < rules.max_model_len, (
        f"{label}: ended by rule 0 after {n} tokens, but a length limit had ended it first "
        f"(max_tokens={p.max_tokens}, max_model_len={rules.max_model_len}, {len(prompt)} prompt tokens)")
    assert all(0 <= t < rules.vocab_size for t in ids), f"{label}: a token id outside the vocabulary: {ids}"
    stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(rules.eos_token_ids))
    for i, t in enumerate(ids):
        assert t not in stop_ids, f"{label}: token {i} = {t} is a stop token but the sample went on"
    if p.stop and rules.decode is not None:
        for k in range(max(p.min_tokens, 1), n + 1):
            hit = _earliest_stop(_text(rules, ids[:k], p), p.stop)
            assert hit is None, f"{label}: stop string {hit[1]!r} was in the text after token {k - 1}, yet it went on"
    want = _text(rules, ids, p)
    assert c.text == want, f"{label}: text {c.text!r}, want {want!r} (token ids {ids})"
    _check_logprobs(ids, p, c, rules, label)


def _check_sample(prompt: list[int], p: SamplingParams, c, rules: ModelRules, label: str) -> None:
    ids = list(c.token_ids)
    n = len(ids)
    limit = p.max_tokens if p.max_tokens is not None else rules.max_model_len
    assert c.finish_reason in ("stop", "length"), f"{label}: finish_reason {c.finish_reason!r}"
    assert n >= 1, f"{label}: finished with no token"
    assert all(0 <= t < rules.vocab_size for t in ids), f"{label}: a token id outside the vocabulary: {ids}"
    # SPEC §5.3: the sample ends once prompt + output reaches max_model_len, so a prompt of
    # exactly max_model_len tokens still yields its one token.
    assert n <= limit and (len(prompt) + n <= rules.max_model_len or n == 1), (
        f"{label}: {n} tokens after a {len(prompt)}-token prompt passes max_tokens={p.max_tokens} "
        f"or max_model_len={rules.max_model_len}")
    stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(rules.eos_token_ids))
    for i, t in enumerate(ids):
        if i < p.min_tokens:  # SPEC §6.1: masked while fewer than min_tokens were generated
            assert t not in stop_ids, f"{label}: token {i} = {t} is a stop token before min_tokens={p.min_tokens}"
        elif i < n - 1:  # SPEC §5.1: a stop token ends the sample where it appears
            assert t not in stop_ids, f"{label}: token {i} = {t} is a stop token but the sample went on"
    # SPEC §5.2: no stop string in the text of any earlier prefix (once min_tokens exist)
    if p.stop and rules.decode is not None:
        for k in range(max(p.min_tokens, 1), n):
            hit = _earliest_stop(_text(rules, ids[:k], p), p.stop)
            assert hit is None, f"{label}: stop string {hit[1]!r} was in the text after token {k - 1}, yet it went on"
    _check_finish(ids, p, c, rules, stop_ids, limit, len(prompt), label)
    _check_logprobs(ids, p, c, rules, label)


def _check_finish(ids, p, c, rules, stop_ids, limit, prompt_len, label) -> None:
    n, last = len(ids), ids[-1]
    full = _text(rules, ids, p)
    hit = _earliest_stop(full, p.stop) if p.stop and rules.decode is not None else None
    if n >= p.min_tokens and last in stop_ids:  # rule 1 comes first
        assert c.finish_reason == "stop", f"{label}: ends with stop token {last} but finish_reason={c.finish_reason!r}"
        want_reason = last if last in p.stop_token_ids else None
        assert c.stop_reason == want_reason, f"{label}: stop_reason {c.stop_reason!r}, want {want_reason!r}"
        want_text = full if p.include_stop_str_in_output else _text(rules, ids[:-1], p)
    elif n >= p.min_tokens and hit is not None:  # rule 2
        pos, s = hit
        assert c.finish_reason == "stop" and c.stop_reason == s, (
            f"{label}: text {full!r} holds stop string {s!r} at {pos}, got finish "
            f"{c.finish_reason!r}/{c.stop_reason!r}")
        want_text = full[: pos + len(s)] if p.include_stop_str_in_output else full[:pos]
    else:  # rule 3
        assert c.finish_reason == "length", (
            f"{label}: finish_reason {c.finish_reason!r} but no stop token/string ends it")
        assert c.stop_reason is None, f"{label}: stop_reason {c.stop_reason!r} on a length finish"
        assert n == limit or prompt_len + n >= rules.max_model_len, (
            f"{label}: length finish after {n} tokens, but max_tokens={p.max_tokens} and "
            f"max_model_len={rules.max_model_len} - {prompt_len} prompt tokens")
        want_text = full
    assert c.text == want_text, f"{label}: text {c.text!r}, want {want_text!r} (token ids {ids})"


def _check_logprobs(ids, p, c, rules, label) -> None:
    if p.logprobs is None:
        assert c.logprobs is None and c.cumulative_logprob is None, f"{label}: logprobs not asked for"
        return
    assert c.logprobs is not None and len(c.logprobs) == len(ids), (
        f"{label}: {0 if c.logprobs is None else len(c.logprobs)} logprob entries for {len(ids)} tokens")
    for i, (t, entry) in enumerate(zip(ids, c.logprobs)):
        _check_entry(entry, t, p.logprobs, rules, f"{label} token {i}")
    total = sum(entry[t].logprob for t, entry in zip(ids, c.logprobs))
    assert c.cumulative_logprob is not None and math.isclose(c.cumulative_logprob, total, rel_tol=1e-4, abs_tol=1e-4), (
        f"{label}: cumulative_logprob {c.cumulative_logprob} != sum of sampled logprobs {total}")


def _check_entry(entry: dict, token: int, k: int, rules: ModelRules, label: str) -> None:
    """The chosen token plus the top-k (SPEC §6): k or k + 1 entries, values <= 0, and each
    rank is 1 + the number of tokens with a larger logprob (exact for the top-k, whose betters
    are all listed; a lower bound for a chosen token below them)."""
    assert token in entry, f"{label}: the chosen token {token} is missing from its logprobs"
    assert len(entry) in (k, k + 1) and len(entry) >= 1, f"{label}: {len(entry)} entries for logprobs={k}"
    values = sorted((lp.logprob for lp in entry.values()), reverse=True)
    kth = values[k - 1] if k >= 1 else math.inf
    for t, lp in entry.items():
        assert lp.logprob <= 1e-6, f"{label}: token {t} has logprob {lp.logprob} > 0"
        better = sum(v > lp.logprob for v in values)
        if lp.logprob >= kth:
            assert lp.rank == better + 1, (
                f"{label}: token {t} (logprob {lp.logprob:.5f}) has rank {lp.rank}, but {better} listed tokens are above it")
        else:
            assert lp.rank > max(k, better), f"{label}: token {t} below the top-{k} has rank {lp.rank}"
        want = None if rules.decode is None else rules.decode([t], False)
        assert lp.decoded_token == want, f"{label}: token {t} decoded_token {lp.decoded_token!r}, want {want!r}"


def _check_prompt_logprobs(prompt, p, output, rules, label) -> None:
    if p.prompt_logprobs is None:
        assert output.prompt_logprobs is None, f"{label}: prompt_logprobs not asked for"
        return
    pl = output.prompt_logprobs
    assert pl is not None and len(pl) == len(prompt) and pl[0] is None, (
        f"{label}: prompt_logprobs must have one entry per prompt token, the first None")
    for i in range(1, len(prompt)):
        _check_entry(pl[i], prompt[i], p.prompt_logprobs, rules, f"{label} prompt position {i}")
