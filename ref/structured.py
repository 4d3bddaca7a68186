"""Structured output on xgrammar: a constraint's grammar, and the oracle's plain per-token mask.

What is shared with `fast` (and so proved not by comparing the engines but by independent
validators — `jsonschema`, `re.fullmatch`, choice membership — in the conformance `structured`
tier and tests/test_structured_vocab.py):
- `grammar_vocabulary`: each token's bytes as the grammar engine sees them (special tokens are
  no text at all: they never match, except EOS where the grammar may end);
- `compile_constraint`: which xgrammar grammar a `StructuredOutputsParams` means.

What is the oracle's own: `allowed_tokens` asks the grammar, token by token, "would you accept
this one?" (accept, then roll back). `fast` instead fills xgrammar's precomputed bitmask for a
whole batch; the two are different code paths of the library, so a wrong mask shows up as a
conformance divergence.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ref.sampling_params import StructuredOutputsParams


def _xgr():
    import xgrammar  # imported on first use: ~2 s, and only constrained requests need it

    return xgrammar


def grammar_vocabulary(tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
    """xgrammar's `TokenizerInfo` for the model's logits (`vocab_size` rows).

    xgrammar's own reader takes every token's surface form, so `<s>` would be the three characters
    `<`, `s`, `>`; but the detokenizer drops special tokens, so the grammar must never see them as
    text. Here every special token and every id the tokenizer does not have is the empty string,
    which xgrammar never allows; EOS is its stop token."""
    xgr = _xgr()
    if tokenizer is None:
        raise ValueError("structured_outputs: a constraint on the output text needs a tokenizer, "
                         "and this model has none")
    detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    special = set(tokenizer.all_special_ids)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    encoded = ["" if i in special or i not in by_id else by_id[i] for i in range(vocab_size)]
    return xgr.TokenizerInfo(encoded, vocab_type=detected.vocab_type, vocab_size=vocab_size,
                             stop_token_ids=list(eos_token_ids), add_prefix_space=detected.add_prefix_space)


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose sentences are exactly the choices (JSON string literals are valid EBNF strings)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def compile_constraint(compiler, so: StructuredOutputsParams):
    """The compiled grammar of a constraint; a ValueError naming the field when it cannot compile."""
    kind = so.kind
    any_ws = not so.disable_any_whitespace
    try:
        if kind == "json":
            schema = so.json if isinstance(so.json, str) else json.dumps(so.json)
            return compiler.compile_json_schema(schema, any_whitespace=any_ws)
        if kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=any_ws)
        if kind == "regex":
            return compiler.compile_regex(so.regex)
        if kind == "choice":
            return compiler.compile_grammar(choice_grammar(so.choice))
        return compiler.compile_grammar(so.grammar)
    except Exception as e:  # xgrammar raises RuntimeError / its own errors on a bad spec
        lines = str(e).strip().splitlines() or [type(e).__name__]
        message = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[-1])  # drop xgrammar's time and C++ file
        raise ValueError(f"structured_outputs.{kind} cannot be compiled: {message}") from None


class TokenGrammar:
    """The oracle's grammar state for one sample: plain, one matcher, no cache, no batching."""

    def __init__(self, compiled: Any, vocab_size: int):
        self.matcher = _xgr().GrammarMatcher(compiled)
        info = compiled.tokenizer_info
        stop = set(info.stop_token_ids)
        # Tokens with no text (special ones, ids past the tokenizer) are never allowed, EOS aside
        # (SPEC §6); not asking about them also spares a warning per id and step from xgrammar.
        self.candidates = [t for t in range(vocab_size) if t in stop or info.decoded_vocab[t]]

    def allowed_tokens(self) -> list[int]:
        """Every token the grammar accepts next (none once it has ended)."""
        m = self.matcher
        if m.is_terminated():
            return []
        allowed = []
        for t in self.candidates:
            if m.accept_token(t):
                allowed.append(t)
                m.rollback(1)
        return allowed

    def accept(self, token_id: int) -> None:
        if not self.matcher.accept_token(token_id):
            raise AssertionError(f"the grammar rejected token {token_id}, which its mask allowed")
