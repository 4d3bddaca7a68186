"""`SamplingParams`: the vLLM-shaped request knobs, validated at construction.

Shared by both engines (`fast` imports it from here), so a request means the same thing to
the oracle and to the engine under test. Every violation is a ValueError naming the field and
the allowed range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SAMPLING_EPS = 1e-5  # temperature below this means greedy (as vLLM)
MAX_SEED = 2**63 - 1


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

    def __post_init__(self) -> None:
        # Only None, a string or a list/tuple are lists of stops: `stop=0`, `stop=False` or a dict
        # must not be read as "no stops" or as the dict's keys.
        _check(self.stop is None or isinstance(self.stop, (str, list, tuple)), "stop",
               "None, a string or a list of non-empty strings", self.stop)
        _check(self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple)),
               "stop_token_ids", "None or a list of integers >= 0", self.stop_token_ids)
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()
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

    def clone(self) -> "SamplingParams":
        """An independent, re-validated copy: engines keep one at add_request, so changing the
        caller's object afterwards cannot change a request that is already queued."""
        return SamplingParams(**{**self.__dict__, "stop": list(self.stop),
                                 "stop_token_ids": list(self.stop_token_ids)})

    def for_sample(self, index: int) -> "SamplingParams":
        """Params of the index-th of n samples: a set seed becomes seed + index (as vLLM)."""
        if self.seed is None or index == 0:
            return self
        return SamplingParams(**{**self.__dict__, "seed": (self.seed + index) % (MAX_SEED + 1)})
