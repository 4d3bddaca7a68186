"""`SamplingParams`: the vLLM-shaped request knobs, validated at construction.

Shared by both engines (`fast` imports it from here), so a request means the same thing to
the oracle and to the engine under test. Every violation is a ValueError naming the field and
the allowed range.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any

SAMPLING_EPS = 1e-5  # temperature below this means greedy (as vLLM)
MAX_SEED = 2**63 - 1
MAX_LOGIT_BIAS = 100.0  # |bias| bound, as OpenAI's logit_bias


@dataclass
class StructuredOutputsParams:
    """A constraint on the output text (vLLM's `StructuredOutputsParams`): set exactly one of

        json         a JSON schema (dict, or its JSON text): the output is one JSON value valid under it
        regex        the output matches the regular expression in full
        choice       the output is exactly one of these strings
        grammar      the output is a sentence of this EBNF grammar (xgrammar's GBNF-style syntax)
        json_object  True: the output is any one JSON object

    disable_any_whitespace: JSON (json / json_object) without whitespace between tokens (by
    default any amount is allowed, as vLLM). SPEC.md "Structured output" gives the semantics.
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    KINDS = ("json", "regex", "choice", "grammar", "json_object")

    def __post_init__(self) -> None:
        set_kinds = [k for k in self.KINDS if getattr(self, k) not in (None, False)]
        _check(len(set_kinds) == 1, "structured_outputs",
               "given exactly one of json, regex, choice, grammar, json_object", set_kinds or None)
        field = f"structured_outputs.{set_kinds[0]}"
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = json.loads(self.json)
                except ValueError as e:
                    raise ValueError(f"{field} must be a JSON schema (a dict or its JSON text), got text "
                                     f"that is not JSON: {e}") from None
            else:
                schema = self.json
                try:  # the compile cache keys on its JSON text
                    json.dumps(schema)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{field} must be a JSON schema made of JSON values, got {e}") from None
            _check(isinstance(schema, (dict, bool)), field, "a JSON schema (an object or a boolean)", self.json)
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, str) and v != ""), f"structured_outputs.{name}",
                   "None or a non-empty string", v)
        if self.choice is not None:
            _check(isinstance(self.choice, (list, tuple)) and len(self.choice) > 0
                   and all(isinstance(c, str) and c for c in self.choice),
                   "structured_outputs.choice", "a non-empty list of non-empty strings", self.choice)
            self.choice = list(self.choice)
        _check(self.json_object in (None, True, False), "structured_outputs.json_object", "None or a bool",
               self.json_object)
        _check(isinstance(self.disable_any_whitespace, bool), "structured_outputs.disable_any_whitespace",
               "a bool", self.disable_any_whitespace)

    @property
    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple:
        """A hashable identity of the constraint (a compile cache key): equal keys, same language."""
        spec: Any = getattr(self, self.kind)
        if self.kind == "json":
            spec = json.dumps(json.loads(spec) if isinstance(spec, str) else spec, sort_keys=True)
        elif self.kind == "choice":
            spec = tuple(spec)
        return (self.kind, spec, self.disable_any_whitespace)


# vLLM's older name for the same thing (`SamplingParams(guided_decoding=GuidedDecodingParams(...))`).
GuidedDecodingParams = StructuredOutputsParams


def _check(ok: bool, name: str, allowed: str, value) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: until max_model_len
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = None  # only these tokens may be sampled
    bad_words: list[str] | None = None  # never generate these words (as token sequences)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    truncate_prompt_tokens: int | None = None  # keep only the last k prompt tokens
    structured_outputs: StructuredOutputsParams | None = None
    guided_decoding: StructuredOutputsParams | None = None  # older vLLM name: moved to structured_outputs

    def __post_init__(self) -> None:
        # Only None, a string or a list/tuple are lists of stops: `stop=0`, `stop=False` or a dict
        # must not be read as "no stops" or as the dict's keys.
        _check(self.stop is None or isinstance(self.stop, (str, list, tuple)), "stop",
               "None, a string or a list of non-empty strings", self.stop)
        _check(self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple)),
               "stop_token_ids", "None or a list of integers >= 0", self.stop_token_ids)
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.guided_decoding is not None:
            _check(self.structured_outputs is None, "guided_decoding",
                   "None when structured_outputs is set (it is the older name of the same field)",
                   self.guided_decoding)
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        self._validate()
        self._validate_token_controls()
        if self.greedy:
            # Greedy ignores the truncation knobs; normalise them as vLLM does.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def _validate(self) -> None:
        _check(_is_int(self.n) and self.n >= 1, "n", "an integer >= 1", self.n)
        t = self.temperature
        _check(_is_num(t) and math.isfinite(t) and t >= 0, "temperature", "a finite number >= 0", t)
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(_is_int(self.top_k) and self.top_k >= -1, "top_k", "-1 or 0 (disabled) or an integer >= 1", self.top_k)
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed <= MAX_SEED),
               "seed", f"None or an integer in [0, {MAX_SEED}]", self.seed)
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(_is_num(v) and -2 <= v <= 2, name, "in [-2, 2]", v)
        r = self.repetition_penalty
        _check(_is_num(r) and math.isfinite(r) and r > 0, "repetition_penalty", "a finite number > 0", r)
        for s in self.stop:
            _check(isinstance(s, str) and len(s) > 0, "stop", "a list of non-empty strings", self.stop)
        for t_id in self.stop_token_ids:
            _check(_is_int(t_id) and t_id >= 0, "stop_token_ids", "a list of integers >= 0", self.stop_token_ids)
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
               "max_tokens", "None or an integer >= 1", self.max_tokens)
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "an integer >= 0", self.min_tokens)
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens",
                   f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _check(v is None or (_is_int(v) and v >= 0), name, "None or an integer >= 0", v)
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            _check(isinstance(getattr(self, name), bool), name, "a bool", getattr(self, name))
        if self.greedy and self.n > 1:
            raise ValueError(
                f"n must be 1 when sampling greedily (temperature={self.temperature!r} < {SAMPLING_EPS}), got {self.n}"
            )

    def _validate_token_controls(self) -> None:
        """allowed_token_ids, bad_words, logit_bias, truncate_prompt_tokens, structured_outputs
        (their vocab bounds are the engine's: `ref.inputs.validate_request`)."""
        a = self.allowed_token_ids
        _check(a is None or (isinstance(a, (list, tuple)) and len(a) > 0 and all(_is_int(t) and t >= 0 for t in a)),
               "allowed_token_ids", "None or a non-empty list of integers >= 0", a)
        self.allowed_token_ids = None if a is None else list(a)
        b = self.bad_words
        _check(b is None or (isinstance(b, (list, tuple)) and all(isinstance(w, str) and w.strip() for w in b)),
               "bad_words", "None or a list of strings with a non-space character", b)
        self.bad_words = None if b is None else list(b)
        lb = self.logit_bias
        _check(lb is None or isinstance(lb, dict), "logit_bias", "None or a dict {token_id: bias}", lb)
        for t, v in (lb or {}).items():
            _check(_is_int(t) and t >= 0, "logit_bias", "keyed by integer token ids >= 0", t)
            _check(_is_num(v) and -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS, f"logit_bias[{t}]",
                   f"a number in [{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]", v)
        self.logit_bias = None if lb is None else {t: float(v) for t, v in lb.items()}
        k = self.truncate_prompt_tokens
        _check(k is None or (_is_int(k) and k >= 1), "truncate_prompt_tokens", "None or an integer >= 1", k)
        so = self.structured_outputs
        _check(so is None or isinstance(so, StructuredOutputsParams), "structured_outputs",
               "None or a StructuredOutputsParams", so)

    def clone(self) -> "SamplingParams":
        """An independent, re-validated copy: engines keep one at add_request, so changing the
        caller's object afterwards cannot change a request that is already queued."""
        so = self.structured_outputs
        return SamplingParams(**{
            **self.__dict__, "stop": list(self.stop), "stop_token_ids": list(self.stop_token_ids),
            "allowed_token_ids": _copy(self.allowed_token_ids), "bad_words": _copy(self.bad_words),
            "logit_bias": _copy(self.logit_bias),
            "structured_outputs": None if so is None else StructuredOutputsParams(
                **{f.name: _copy(getattr(so, f.name)) for f in fields(so)}),
        })

    def for_sample(self, index: int) -> "SamplingParams":
        """Params of the index-th of n samples: a set seed becomes seed + index (as vLLM)."""
        if self.seed is None or index == 0:
            return self
        return SamplingParams(**{**self.__dict__, "seed": (self.seed + index) % (MAX_SEED + 1)})


def _copy(x):
    """A copy of a params container (list/dict; a JSON-schema dict deeply) so a queued request
    cannot be changed through the caller's object."""
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy(v) for v in x]
    return x
