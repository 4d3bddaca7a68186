"""The shared grammar vocabulary and the oracle's mask, proved against independent definitions.

`ref.structured.grammar_vocabulary` decides which bytes the grammar engine thinks each token is;
both engines use it, so comparing them cannot catch a mistake in it. Here it is checked token by
token against what the tokenizer itself decodes (and, for byte-level tokens that are only part of
a UTF-8 character, against the GPT-2 byte alphabet), and `TokenGrammar.allowed_tokens()` is
checked against a brute-force mask from the `regex` module's partial matching.
"""

from __future__ import annotations

import re

import pytest
import regex
from hypothesis import given, note, strategies as st

from ref.sampling_params import StructuredOutputsParams
from ref.structured import TokenGrammar, compile_constraint, grammar_vocabulary

VOCAB = 512
EOS = 2


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from ref.tokenizer import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def vocab_info(tokenizer):
    return grammar_vocabulary(tokenizer, VOCAB, (EOS,))


@pytest.fixture(scope="module")
def compiler(vocab_info):
    import xgrammar

    return xgrammar.GrammarCompiler(vocab_info)


def gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte (openai/gpt-2 `bytes_to_unicode`),
    inverted: printable Latin-1 bytes stand for themselves, the other bytes are 256 + n in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    return {c: b for b, c in chars.items()}


def byte_level_bytes(tokenizer, token_id: int) -> bytes:
    """A byte-level BPE token's bytes via the GPT-2 byte alphabet (each byte is one printable char)."""
    char_to_byte = gpt2_byte_alphabet()
    return bytes(char_to_byte[c] for c in tokenizer.convert_ids_to_tokens(token_id))


def token_bytes(tokenizer, token_id: int) -> bytes:
    """What the tokenizer decodes the token to; byte-level tokens that are part of a UTF-8
    character decode to U+FFFD, so those take the byte-alphabet route."""
    text = tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
    return byte_level_bytes(tokenizer, token_id) if "\ufffd" in text else text.encode("utf-8")


def test_every_token_is_the_bytes_the_tokenizer_decodes_it_to(tokenizer, vocab_info):
    special = set(tokenizer.all_special_ids)
    held = vocab_info.decoded_vocab
    assert len(held) == VOCAB
    partial = 0
    for t in range(VOCAB):
        if t in special:
            continue
        want = token_bytes(tokenizer, t)
        partial += "\ufffd" in tokenizer.decode([t])
        assert held[t] == want, f"token {t}: grammar holds {held[t]!r}, the tokenizer decodes {want!r}"
    assert partial > 0, "no token took the partial-UTF-8 route: that branch is untested"


def test_special_tokens_are_no_text_and_eos_is_the_stop_token(tokenizer, vocab_info):
    assert set(tokenizer.all_special_ids) == {0, 1, 2}
    for t in tokenizer.all_special_ids:
        assert vocab_info.decoded_vocab[t] == b"", f"special token {t} must be no text"
    assert list(vocab_info.stop_token_ids) == [EOS]


# ---------------------------------------------------------------- regex masks, brute force
ALPHABET = "abc "


def regexes() -> st.SearchStrategy[str]:
    """Small regexes over ALPHABET: literals, classes, groups, alternation, repetition."""
    atom = st.one_of(
        st.sampled_from(list("abc")).map(str),
        st.just(" "),
        st.sampled_from(["[ab]", "[bc]", "[a-c]", "[ a]"]),
    )

    def extend(inner):
        rep = st.sampled_from(["?", "*", "+", "{2}", "{1,3}", "{0,2}"])
        return st.one_of(
            st.lists(inner, min_size=2, max_size=3).map("".join),
            st.lists(inner, min_size=2, max_size=3).map(lambda xs: "(" + "|".join(xs) + ")"),
            st.tuples(inner, rep).map(lambda x: "(" + x[0] + ")" + x[1]),
        )

    return st.recursive(atom, extend, max_leaves=6)


def brute_force_mask(pattern: str, text: str, texts: dict[int, str | None]) -> set[int]:
    """Tokens after which `text` is still a prefix of a match (regex partial matching), and EOS
    when `text` already matches in full. A token that is no ASCII text can never match."""
    allowed = {t for t, s in texts.items()
               if s is not None and regex.fullmatch(pattern, text + s, partial=True) is not None}
    if re.fullmatch(pattern, text) is not None:
        allowed.add(EOS)
    return allowed


@pytest.fixture(scope="module")
def ascii_texts(tokenizer, vocab_info) -> dict[int, str | None]:
    """Each non-special token's text when it is ASCII (None otherwise), from the tokenizer."""
    special = set(tokenizer.all_special_ids)
    out = {}
    for t in range(VOCAB):
        if t in special:
            continue
        b = token_bytes(tokenizer, t)
        out[t] = b.decode("ascii") if b.isascii() else None
    return out


@given(pattern=regexes(), data=st.data())
def test_regex_mask_equals_brute_force_at_reachable_states(pattern, data, compiler, ascii_texts):
    note(f"pattern {pattern!r}")
    grammar = TokenGrammar(compile_constraint(compiler, StructuredOutputsParams(regex=pattern)), VOCAB)
    text = ""
    for _ in range(4):
        got = set(grammar.allowed_tokens())
        want = brute_force_mask(pattern, text, ascii_texts)
        assert got == want, (f"after {text!r}: grammar-only {sorted(got - want)[:8]}, "
                             f"brute-force-only {sorted(want - got)[:8]}")
        choices = sorted(want - {EOS})
        if not choices:
            break
        token = data.draw(st.sampled_from(choices), label="next token")
        grammar.accept(token)
        text += ascii_texts[token]
