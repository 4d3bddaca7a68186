"""Turning user prompts into validated token-id requests, before any engine state changes.

Shared by both engines: a bad request is rejected with the same ValueError by `ref` and `fast`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from ref.sampling_params import SamplingParams, StructuredOutputsParams
from ref.tokenizer import TextCodec

PromptType = "str | dict[str, Any]"  # a string, or {"prompt_token_ids": [...], "prompt"?: str}


# Bounds on what one request may ask for, so that no single request can stall an engine
# (README "Limits"). Engines expose max_n as an option; the stop bounds are fixed.
DEFAULT_MAX_N = 128  # as OpenAI's API; a request of n samples holds n sequences
MAX_STOP_STRINGS = 64  # each is searched for in the output text after every token
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_BAD_WORDS = 64  # each is two token sequences checked against the output after every token
MAX_BAD_WORD_CHARS = 1024
MAX_STRUCTURED_CHARS = 65_536  # a constraint's text (schema, regex, grammar, choices): compile cost


@dataclass(frozen=True)
class RequestLimits:
    """The engine-side bounds a request is checked against."""

    vocab_size: int
    max_model_len: int
    max_logprobs: int
    max_n: int = DEFAULT_MAX_N


def check_request_id(request_id: Any) -> None:
    """A request id is a non-empty string (SPEC §4); raises ValueError naming the field."""
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")


def request_ids_to_abort(request_id: Any) -> list[str]:
    """`abort_request`'s argument: one id or a list/tuple of ids, as a list of ids."""
    ids = [request_id] if isinstance(request_id, str) else request_id
    if not isinstance(ids, (list, tuple, set, frozenset)) or not all(isinstance(r, str) for r in ids):
        raise ValueError(f"request_id must be a string or a list of strings, got {request_id!r}")
    return list(ids)


@dataclass(frozen=True)
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int]


def process_prompt(prompt: Any, codec: TextCodec) -> ProcessedPrompt:
    """A string (encoded with the tokenizer) or a {'prompt_token_ids': [...]} dict."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt must be a non-empty string, got ''")
        try:  # a lone surrogate (e.g. from a JSON "\\ud800") cannot be tokenized
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"prompt must be valid Unicode text, got an unpaired surrogate at "
                             f"character {e.start}") from None
        return ProcessedPrompt(prompt, codec.encode(prompt))
    if isinstance(prompt, dict):
        unknown = set(prompt) - {"prompt_token_ids", "prompt"}
        if unknown or "prompt_token_ids" not in prompt:
            raise ValueError(
                f"prompt dict must have key 'prompt_token_ids' (and optionally 'prompt'), got keys {sorted(prompt)}"
            )
        ids = prompt["prompt_token_ids"]
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"prompt_token_ids must be a list of integers, got {type(ids).__name__}")
        text = prompt.get("prompt")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"prompt (the text beside prompt_token_ids) must be a string or None, "
                             f"got {type(text).__name__}")
        return ProcessedPrompt(text, list(ids))
    raise ValueError(f"prompt must be a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}")


def check_params_type(params: Any) -> None:
    """A request's params are a SamplingParams (None was replaced by the defaults before)."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")


def truncate_prompt(p: ProcessedPrompt, params: SamplingParams) -> ProcessedPrompt:
    """The prompt with only its last `truncate_prompt_tokens` token ids (SPEC §3); the text stays
    the text given. Applied before `validate_request`, so the length check sees the kept tokens."""
    check_params_type(params)
    k = params.truncate_prompt_tokens
    if k is None or len(p.prompt_token_ids) <= k:
        return p
    return ProcessedPrompt(p.prompt, p.prompt_token_ids[-k:])


def validate_request(p: ProcessedPrompt, params: SamplingParams, limits: RequestLimits,
                     has_tokenizer: bool) -> None:
    """Every engine-dependent rule of SPEC.md "Bad requests"; raises ValueError naming the field."""
    check_params_type(params)
    ids = p.prompt_token_ids
    if not ids:
        raise ValueError("prompt_token_ids must be non-empty, got []")
    bad = [t for t in ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise ValueError(f"prompt_token_ids must be in [0, {limits.vocab_size}) (vocab size), got {bad[0]}")
    if len(ids) > limits.max_model_len:
        raise ValueError(
            f"prompt length must be <= max_model_len ({limits.max_model_len}), got {len(ids)} tokens"
        )
    for name in ("logprobs", "prompt_logprobs"):
        v = getattr(params, name)
        if v is not None and v > limits.max_logprobs:
            raise ValueError(f"{name} must be <= max_logprobs ({limits.max_logprobs}), got {v}")
    bad_stop = [t for t in params.stop_token_ids if t >= limits.vocab_size]
    if bad_stop:
        raise ValueError(f"stop_token_ids must be in [0, {limits.vocab_size}) (vocab size), got {bad_stop[0]}")
    if params.n > limits.max_n:
        raise ValueError(f"n must be <= max_n ({limits.max_n}), got {params.n}")
    if len(params.stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop must have at most {MAX_STOP_STRINGS} strings, got {len(params.stop)}")
    long_stop = [s for s in params.stop if len(s) > MAX_STOP_STRING_CHARS]
    if long_stop:
        raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters, "
                         f"got one of {len(long_stop[0])}")
    if len(params.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"stop_token_ids must have at most {MAX_STOP_TOKEN_IDS} ids, "
                         f"got {len(params.stop_token_ids)}")
    if params.stop and not has_tokenizer:
        raise ValueError("stop: stop strings need a tokenizer, and this model has none")
    _validate_token_controls(params, limits.vocab_size, has_tokenizer)


def _validate_token_controls(params: SamplingParams, vocab_size: int, has_tokenizer: bool) -> None:
    """SPEC §4's rules for allowed_token_ids, logit_bias, bad_words and structured_outputs (the
    constraint is compiled by the engine, after these checks)."""
    for name, ids in (("allowed_token_ids", params.allowed_token_ids or []),
                      ("logit_bias keys", list(params.logit_bias or {}))):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise ValueError(f"{name} must be in [0, {vocab_size}) (vocab size), got {bad[0]}")
    words = params.bad_words or []
    if len(words) > MAX_BAD_WORDS:
        raise ValueError(f"bad_words must have at most {MAX_BAD_WORDS} words, got {len(words)}")
    long_word = [w for w in words if len(w) > MAX_BAD_WORD_CHARS]
    if long_word:
        raise ValueError(f"bad_words must be at most {MAX_BAD_WORD_CHARS} characters each, "
                         f"got one of {len(long_word[0])}")
    if words and not has_tokenizer:
        raise ValueError("bad_words: bad words need a tokenizer, and this model has none")
    so = params.structured_outputs
    if so is None:
        return
    if not has_tokenizer:
        raise ValueError("structured_outputs: a constraint on the output text needs a tokenizer, "
                         "and this model has none")
    chars = structured_spec_chars(so)
    if chars > MAX_STRUCTURED_CHARS:
        raise ValueError(f"structured_outputs.{so.kind} must be at most {MAX_STRUCTURED_CHARS} characters, "
                         f"got {chars}")


def structured_spec_chars(so: StructuredOutputsParams) -> int:
    """The size of a constraint's text: the schema as JSON text, the regex, the grammar, or all
    choices together (json_object has none to speak of)."""
    if so.kind == "json":
        return len(so.json if isinstance(so.json, str) else json.dumps(so.json))
    if so.kind == "choice":
        return sum(len(c) for c in so.choice)
    if so.kind in ("regex", "grammar"):
        return len(getattr(so, so.kind))
    return 0


def bad_words_token_ids(codec: TextCodec, words: list[str]) -> list[list[int]]:
    """The token sequences `bad_words` forbid (SPEC §6): each word, without special tokens, as
    `word.lstrip()` (at the start of the text) and as `" " + word.lstrip()` (after a space, which
    byte-level tokenizers fold into the word's first token); distinct non-empty ones, in order."""
    seqs: list[list[int]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = codec.encode(text, add_special_tokens=False)
            if ids and ids not in seqs:
                seqs.append(ids)
    return seqs


def normalize_batch(prompts: Any, sampling_params: Any) -> list[tuple[Any, SamplingParams]]:
    """One prompt or a list; one SamplingParams (or None: defaults) or a list of equal length."""
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or isinstance(prompts, str):
        raise ValueError(f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}")
    if sampling_params is None:
        sampling_params = SamplingParams()
    if isinstance(sampling_params, SamplingParams):
        params_list = [sampling_params] * len(prompts)
    else:
        params_list = list(sampling_params)
        if len(params_list) != len(prompts):
            raise ValueError(
                f"sampling_params must be one SamplingParams or a list of len(prompts)={len(prompts)}, "
                f"got a list of {len(params_list)}"
            )
    return list(zip(prompts, params_list))
