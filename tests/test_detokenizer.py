"""fast's incremental detokenizer and stop checker against the full decode and `ref.sequence`.

For random id sequences on every tokenizer family the tests know (the project's byte-level BPE,
a sentencepiece-like Metaspace + byte-fallback one, a WordPiece one whose decode cleans up spaces
before punctuation), after every appended token:
- the incremental text equals `codec.decode(all ids, skip_special_tokens)`, and the detokenizer's
  invariants hold (committed text, context, the stop-search look-back);
- `StopChecker` returns the same text, finish_reason and stop_reason as `ref.sequence.check_stop`
  (the oracle), with stop strings cut from the decoded text so that they hit.
The sequences mix whole tokens, special tokens, and the byte tokens of multi-byte characters —
complete, cut short, or in a wrong order — so U+FFFD appears and later turns into a character.
"""

from __future__ import annotations

import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from fast.core.detokenizer import CONTEXT_TOKENS, IncrementalDetokenizer, StopChecker
from ref.sampling_params import SamplingParams
from ref.sequence import StopContext, check_stop
from ref.tokenizer import TextCodec

CHARS = "aZ .,'!?é€😀\u00a0ñ"  # ASCII, punctuation the WordPiece clean-up touches, 2/3/4-byte characters
ASCII_PIECES = [chr(c) for c in range(ord("!"), ord("~") + 1)]


class Family:
    """A tokenizer with what the strategies need: specials, and each byte's token id."""

    def __init__(self, name: str, codec: TextCodec, byte_ids: dict[int, int], pieces: str = ""):
        self.name, self.codec, self.byte_ids = name, codec, byte_ids
        self.vocab_size = len(codec.tokenizer)
        self.special_ids = sorted(codec.tokenizer.all_special_ids)
        # tokens whose decode depends on their neighbours (drawn often, else seldom met)
        self.tricky_ids = codec.tokenizer.convert_tokens_to_ids(pieces.split()) if pieces else self.special_ids

    def __repr__(self) -> str:  # Hypothesis prints it in a falsifying example
        return self.name


def _byte_level(tiny_model_dir: str) -> Family:
    from ref.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    to_char = _gpt2_bytes_to_unicode()
    return Family("byte-level BPE (tiny checkpoints)", TextCodec(tok),
                  {b: tok.convert_tokens_to_ids(to_char[b]) for b in range(256)})


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _sentencepiece_like(metaspace_decoder: bool) -> Family:
    """Whole pieces with "▁" word starts plus <0xNN> byte tokens, decoded as Llama 2 does
    (Replace, ByteFallback, Fuse, Strip one leading space) or by a Metaspace decoder."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", "▁", "▁the", "▁a", "▁b", "é", "'", "▁▁", "ñ", "▁€", *ASCII_PIECES]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")  # encode char by char; the rest as <0xNN> bytes
    if metaspace_decoder:
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    else:
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    name = "Metaspace decoder" if metaspace_decoder else "sentencepiece-like (byte fallback)"
    return Family(name, TextCodec(fast), {b: vocab[f"<0x{b:02X}>"] for b in range(256)}, "▁ ▁▁ ▁the ▁a a ▁€ <s>")


def _wordpiece_with_cleanup() -> Family:
    """BERT-like: "##" continuations, and clean_up_tokenization_spaces removes a space before
    punctuation and contractions, so a new token can change text decoded before it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "do", "n't", "'", "s", "m", "'s", "'m", "hello", "##lo", "##s",
              "é", "##é", *ASCII_PIECES, *("##" + c for c in ASCII_PIECES)]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="[PAD]", clean_up_tokenization_spaces=True)
    return Family("WordPiece + clean_up_tokenization_spaces", TextCodec(fast), {},
                  "do n't ' s m 's 'm . , ? ! ##s ##é a [SEP]")


@pytest.fixture(scope="module")
def families(tiny_model_dir) -> list[Family]:
    return [_byte_level(tiny_model_dir), _sentencepiece_like(False), _sentencepiece_like(True),
            _wordpiece_with_cleanup()]


def test_the_families_decode_as_their_kind(families):
    """The fixtures are what they claim (else the properties below test less than they say)."""
    byte_level, sentencepiece, metaspace, wordpiece = families
    euro = [byte_level.byte_ids[b] for b in "€".encode()]
    assert byte_level.codec.decode(euro[:2]) == "\ufffd" and byte_level.codec.decode(euro) == "€"
    euro = [sentencepiece.byte_ids[b] for b in "€".encode()]
    assert sentencepiece.codec.decode(euro[:2]) == "\ufffd\ufffd" and sentencepiece.codec.decode(euro) == "€"
    the = metaspace.codec.tokenizer.convert_tokens_to_ids("▁the")
    assert metaspace.codec.decode([the, the]) == "the the"  # the first word's space is dropped
    hello, dot = (wordpiece.codec.tokenizer.convert_tokens_to_ids(t) for t in ("hello", "."))
    assert wordpiece.codec.decode([hello]) + " ." != wordpiece.codec.decode([hello, dot]) == "hello."


# ---- strategies ----------------------------------------------------------------------------------

@st.composite
def token_ids(draw, family: Family, max_pieces: int = 40) -> list[int]:
    """Whole tokens, specials, and characters as byte tokens (whole, cut, or shuffled)."""
    ids: list[int] = []
    for _ in range(draw(st.integers(0, max_pieces))):
        kind = draw(st.sampled_from(["token", "special", "tricky", "char", "char", "cut char", "byte"]))
        if kind == "token" or not family.byte_ids and kind not in ("special", "tricky"):
            ids.append(draw(st.integers(0, family.vocab_size - 1)))
        elif kind in ("special", "tricky"):
            ids.append(draw(st.sampled_from(family.special_ids if kind == "special" else family.tricky_ids)))
        elif kind == "byte":
            ids.append(family.byte_ids[draw(st.integers(0x80, 0xFF))])
        else:
            raw = draw(st.sampled_from(CHARS)).encode()
            if kind == "cut char" and len(raw) > 1:
                raw = raw[: draw(st.integers(1, len(raw) - 1))]
            ids += [family.byte_ids[b] for b in raw]
    return ids


@st.composite
def family_and_ids(draw, families: list[Family]):
    family = draw(st.sampled_from(families))
    return family, draw(token_ids(family)), draw(st.booleans())


@st.composite
def stop_strings(draw, text: str) -> list[str]:
    """Up to 3 stop strings, most cut from `text` (so they hit, sometimes at several places)."""
    stops = []
    for _ in range(draw(st.integers(0, 3))):
        if text and draw(st.integers(0, 3)):
            start = draw(st.integers(0, len(text) - 1))
            stops.append(text[start:start + draw(st.integers(1, 4))])
        else:
            stops.append(draw(st.text(alphabet=CHARS + "\ufffd", min_size=1, max_size=3)))
    return stops


# ---- properties --------------------------------------------------------------------------------

@given(data=st.data())
def test_incremental_text_is_the_full_decode_after_every_token(families, data):
    family, ids, skip = data.draw(family_and_ids(families))
    note(f"{family.name}, skip_special_tokens={skip}, ids={ids}")
    detok = IncrementalDetokenizer(family.codec, skip, lookback=data.draw(st.integers(0, 5)))
    for k, token in enumerate(ids, 1):
        changed = detok.append(token)
        before, now = family.codec.decode(ids[:k - 1], skip), family.codec.decode(ids[:k], skip)
        assert now[:changed] == before[:changed], f"token {k}: text before index {changed} changed"
        assert changed == len(now) or changed >= len(before) or now[changed] != before[changed], (
            f"token {k}: reported change at {changed} but the texts agree there")
        detok.check_invariants(ids[:k])
    if family is families[0]:  # lossy UTF-8 over bytes: the window split is exact, never rewound
        assert detok.num_rewinds == 0, "a byte-level decode rewound"


@given(data=st.data())
def test_stop_decisions_equal_the_oracle(families, data):
    family, ids, skip = data.draw(family_and_ids(families))
    full = family.codec.decode(ids, skip)
    eos = family.special_ids[-1]
    stop_ids = data.draw(st.lists(st.sampled_from(ids), max_size=2)) if ids and data.draw(st.booleans()) else []
    max_tokens = data.draw(st.integers(1, len(ids) + 1)) if data.draw(st.booleans()) else None
    params = SamplingParams(
        stop=data.draw(stop_strings(full)), stop_token_ids=stop_ids, ignore_eos=data.draw(st.booleans()),
        max_tokens=max_tokens, min_tokens=data.draw(st.integers(0, min(3, max_tokens or 3))),
        skip_special_tokens=skip, include_stop_str_in_output=data.draw(st.booleans()))
    ctx = StopContext(eos_token_ids=(eos,), max_model_len=data.draw(st.integers(len(ids) + 3, len(ids) + 60)),
                      codec=family.codec)
    prompt_len = data.draw(st.integers(1, 50))
    note(f"{family.name}, params={params}, max_model_len={ctx.max_model_len}, ids={ids}")
    checker = StopChecker(params, prompt_len, ctx)
    for k, token in enumerate(ids, 1):
        reason, stop_reason = checker.append(token)
        want = check_stop(ids[:k], params, prompt_len, ctx)
        assert (checker.text, reason, stop_reason) == want, f"after token {k} of {ids}"
        if reason is not None:
            break


def test_stop_string_completed_by_a_character_that_was_fffd(families):
    """Stop strings "é" and "aé" appear where the text held U+FFFD one token earlier: the search
    must cover the changed text, not only the new characters."""
    byte_level = families[0]
    ids = [byte_level.codec.tokenizer.convert_tokens_to_ids("a")] + [byte_level.byte_ids[b] for b in "é".encode()]
    ctx = StopContext((2,), 1000, byte_level.codec)
    for stop, want in (("é", (3, "a")), ("\ufffd", (2, "a")), ("aé", (3, ""))):
        params = SamplingParams(stop=[stop], max_tokens=10)
        checker = StopChecker(params, 3, ctx)
        for k, token in enumerate(ids, 1):
            result = checker.append(token)
            assert (checker.text, *result) == check_stop(ids[:k], params, 3, ctx), (stop, k)
            if result[0] is not None:
                break
        assert (k, checker.text, *result) == (*want, "stop", stop)


# ---- the work stays O(1) per token -----------------------------------------------------------------

class CountingCodec(TextCodec):
    """Counts the token ids that pass through decode."""

    def __init__(self, codec: TextCodec):
        super().__init__(codec.tokenizer)
        self.decoded_ids = 0

    def decode(self, token_ids, skip_special_tokens=True):
        self.decoded_ids += len(token_ids)
        return super().decode(token_ids, skip_special_tokens)


@pytest.mark.parametrize("family_index", [0, 1, 2, 3])
def test_decoded_ids_per_token_stay_bounded(families, family_index):
    """Real text, encoded and then streamed token by token (specials among it): a token costs a
    bounded number of decoded ids (the window: at most 2 * CONTEXT_TOKENS + a few), the same at
    100 tokens as at 1000, and no full decode (the clean-ups of the WordPiece family rewind a
    few tokens only)."""
    family = families[family_index]
    text = "The old fisherman watched the gulls, émigré café naïve façade — 3.14 ≈ π! 😀 I don't know , he 's here . "
    ids = family.codec.encode(text * 12)
    ids = [t for i, t in enumerate(ids) for t in ([t, family.special_ids[0]] if i % 50 == 7 else [t])]
    codec = CountingCodec(family.codec)
    checker = StopChecker(SamplingParams(stop=["never in the text"], max_tokens=None, skip_special_tokens=True),
                          1, StopContext((), 10**6, codec))
    per_token = []
    for k, t in enumerate(ids, 1):
        assert checker.append(t) == (None, None)
        if k in (100, len(ids)):
            per_token.append(codec.decoded_ids / k)
    assert checker.text == family.codec.decode(ids), family.name
    assert max(per_token) < 2 * CONTEXT_TOKENS + 6, f"{family.name}: {per_token} ids decoded per token"
    assert per_token[1] < per_token[0] * 1.25, f"{family.name}: the cost per token grows: {per_token}"
    assert checker.detokenizer.num_full_decodes == 0, family.name
    if family_index != 3:  # only clean-up rewrites text behind the window here
        assert checker.detokenizer.num_rewinds == 0, family.name
