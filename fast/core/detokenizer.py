"""Incremental detokenization and stop rules: O(1) amortized work per generated token.

SPEC §5 defines a sample's text as `decode(output_ids, skip_special_tokens)` of the whole output
and looks for stop strings anywhere in it. The oracle (`ref.sequence.check_stop`) does exactly
that after every token: a full decode and a full search, O(output) per token and O(output²) per
request. `StopChecker` makes the same decisions from the same text, kept by an
`IncrementalDetokenizer` that decodes only a short window of trailing tokens:

    output ids   | committed ............................ | context | tail ....... |
                 0                                      prefix    read           len
    text       = decode(ids[:read])   +   decode(ids[prefix:])[len(decode(ids[prefix:read])):]
                 (kept; never decoded again)  (the window: the only part decoded per token)

- `read` moves to the end of the ids (the tail is *committed*, a new anchor) only where the text
  does not end in U+FFFD: there the decoder holds no partial UTF-8 character that a later token
  could complete, so the committed text is final. Commits happen at the start of the next `append`.
- The window starts CONTEXT_TOKENS to 2 * CONTEXT_TOKENS tokens before `read`, at an older anchor
  (where no character is split). A decoder may treat a sequence's first token differently (a
  Metaspace decoder drops its leading space) and a clean-up may rewrite the characters just before
  a new token: the context absorbs the first and puts the second where the check below sees it.
- Checked, not assumed: when the window's text does not start with the context's own text, the new
  token changed text before `read` (`clean_up_tokenization_spaces` turning " ' " into "'", a
  byte-fallback group turning invalid). The step rewinds to an older anchor whose context still
  decodes alike (1, 2, 4, ... commits back; a full decode past the oldest kept), so the text is
  still exactly the full decode, at a cost of O(how far back the change reached).
- Tokens that the decode drops anyway (special tokens under skip_special_tokens) are dropped on
  arrival: a run of them costs no decode and no window.

For a byte-level BPE tokenizer (the project's tiny checkpoints) the split is exact, not only
checked: its decode is lossy UTF-8 over the tokens' bytes, and after bytes whose decode does not end
in U+FFFD the decoder starts afresh, so the text after `read` depends on the bytes after `read`
only. Other decoders rely on the check; tests/test_detokenizer.py compares every step with the full
decode for byte-level, Metaspace + byte-fallback and WordPiece + clean-up tokenizers.

Stop strings: after a token that did not finish the sample, no stop string occurs in its text. So
a new occurrence must end in the part of the text that changed (from `changed`, the first index
that differs from the previous text): it starts at or after `changed - longest stop + 1`, and the
earliest occurrence of each string is found by searching from there (SPEC: earliest position
wins, ties go to the string listed first). The first search, when `min_tokens` is reached, scans
the whole text once.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from ref.sampling_params import SamplingParams
from ref.sequence import StopContext
from ref.tokenizer import TextCodec

REPLACEMENT_CHAR = "\ufffd"  # what a decode shows for an incomplete (or invalid) UTF-8 sequence


class _Anchor(NamedTuple):
    """A commit point: decode(ids[:read]) is the committed text's first `length` characters, and
    `context` is decode(ids[prefix:read]) on its own (the window starts at `prefix`)."""

    read: int
    prefix: int
    context: str
    length: int


_ORIGIN = _Anchor(0, 0, "", 0)  # the window from token 0 is the full decode: always right
MAX_ANCHORS = 64  # commit points kept to fall back to; beyond them, a full decode
# Tokens decoded before the tail. A decoder may treat a sequence's first token differently (a
# Metaspace decoder drops its leading space) and a clean-up may rewrite a few characters before
# the new token (" ' " -> "'"): the context absorbs the first and lets the check see the second.
CONTEXT_TOKENS = 4
MAX_UNJOINED = 256


class IncrementalDetokenizer:
    """`codec.decode(ids, skip_special_tokens)` of a growing list of ids, kept current per token.

    Invariants (`check_invariants`, which the tests run against the full decode):
    - text == committed text + tail == decode(ids); committed text == decode(ids[:anchor.read]).
    - every kept anchor (and the newest one) holds: context == decode(ids[prefix:read]),
      length == len(decode(ids[:read])), prefix <= read <= len(ids).
    - `recent` is the last `lookback` characters of the committed text.
    """

    def __init__(self, codec: TextCodec, skip_special_tokens: bool, lookback: int = 0):
        self._codec = codec
        self._skip = skip_special_tokens
        self._dropped = _skipped_ids(codec) if skip_special_tokens else frozenset()
        self._lookback = lookback
        self._ids: list[int] = []  # the output ids the decode sees (dropped tokens left out)
        self._anchors: deque[_Anchor] = deque(maxlen=MAX_ANCHORS)  # oldest first; newest = current
        self._committed = ""  # the committed text, up to the pieces not yet joined
        # Committed pieces, joined when someone reads `text` or when MAX_UNJOINED pile up (one
        # small str per token would hold ~50 bytes a token; joining every 256 costs O(length/256)).
        self._unjoined: list[str] = []
        self._recent = ""
        self._tail = ""
        self.num_rewinds = 0  # steps whose token changed committed text (tests, benchmarks read it)
        self.num_full_decodes = 0  # ... of which the change reached past every kept anchor

    @property
    def _anchor(self) -> _Anchor:
        return self._anchors[-1] if self._anchors else _ORIGIN

    # ---- reading ------------------------------------------------------------------------------
    @property
    def text(self) -> str:
        """The whole text: O(length) to build, so the per-token path never reads it."""
        self._join()
        return self._committed + self._tail

    def _join(self) -> None:
        if self._unjoined:
            self._committed += "".join(self._unjoined)
            self._unjoined.clear()

    def text_from(self, start: int) -> str:
        """text[start:]: O(len(text) - start) while `start` is within the last `lookback`
        characters of the committed text or later; else the whole text is built."""
        committed_len = self._anchor.length
        recent_start = committed_len - len(self._recent)
        if start >= committed_len:
            return self._tail[start - committed_len:]
        if start >= recent_start:
            return self._recent[start - recent_start:] + self._tail
        return self.text[start:]

    # ---- appending ----------------------------------------------------------------------------
    def append(self, token_id: int) -> int:
        """Add one token; returns the index of the first character of the text that changed
        (len(text) when nothing did)."""
        if not self._codec.has_tokenizer or token_id in self._dropped:
            return self._anchor.length + len(self._tail)
        self._commit_tail()
        self._ids.append(token_id)
        anchor = self._anchor
        window = self._decode(self._ids[anchor.prefix:])
        if window.startswith(anchor.context):  # the usual case: only the tail changed
            tail = window[len(anchor.context):]
            changed = anchor.length + _common_prefix_len(self._tail, tail)
            self._tail = tail
            return changed
        return self._rewind()

    def _commit_tail(self) -> None:
        """Commit the tail unless the text ends in an incomplete character (a new anchor at the
        end). The window keeps its start until it holds 2 * CONTEXT_TOKENS committed tokens; then
        it starts again CONTEXT_TOKENS (or more) before the end, at an older anchor."""
        anchor = self._anchor
        end = len(self._ids)
        if anchor.read == end or self._tail.endswith(REPLACEMENT_CHAR):
            return
        if end - anchor.prefix <= 2 * CONTEXT_TOKENS:  # same window start: its text is known
            prefix, context = anchor.prefix, anchor.context + self._tail
        else:
            prefix, context = self._new_context(end)
        self._anchors.append(_Anchor(end, prefix, context, anchor.length + len(self._tail)))
        self._unjoined.append(self._tail)
        if len(self._unjoined) >= MAX_UNJOINED:
            self._join()
        if self._lookback:
            self._recent = (self._recent + self._tail)[-self._lookback:]
        self._tail = ""

    def _new_context(self, end: int) -> tuple[int, str]:
        """(prefix, decode(ids[prefix:end])): the newest anchor at least CONTEXT_TOKENS before
        `end` whose context text is not empty (an anchor: a point where no character is split)."""
        for anchor in reversed(self._anchors):
            if anchor.read <= end - CONTEXT_TOKENS:
                context = self._decode(self._ids[anchor.read:end])
                if context:
                    return anchor.read, context
        return 0, self._decode(self._ids[:end])

    def _rewind(self) -> int:
        """The new token changed text before the window (a clean-up of spaces, a byte-fallback
        group turning invalid): go back to an older anchor whose context still decodes alike,
        trying those 1, 2, 4, ... commits before the current one, then the origin (a full
        decode); the anchors after it are dropped. The cost is O(how far back the change reached)."""
        self.num_rewinds += 1
        old = self.text
        kept = list(self._anchors)
        for back in _rewind_offsets(len(kept)):
            anchor = kept[-back]
            window = self._decode(self._ids[anchor.prefix:])
            if window.startswith(anchor.context):
                for _ in range(back - 1):
                    self._anchors.pop()
                break
        else:
            self.num_full_decodes += 1
            anchor, window = _ORIGIN, self._decode(self._ids)
            self._anchors.clear()
        self._committed = old[:anchor.length]
        self._recent = self._committed[-self._lookback:] if self._lookback else ""
        self._tail = window[len(anchor.context):]
        return anchor.length + _common_prefix_len(old[anchor.length:], self._tail)

    def _decode(self, ids: list[int]) -> str:
        return self._codec.decode(ids, self._skip)

    # ---- invariants ---------------------------------------------------------------------------
    def check_invariants(self, output_ids: list[int]) -> None:
        """Compare with full decodes of `output_ids` (every id appended so far) and of each kept
        anchor's ids: O(MAX_ANCHORS * length), for tests."""
        full = self._codec.decode(list(output_ids), self._skip)
        assert self.text == full, f"incremental text {self.text!r} != full decode {full!r} of {list(output_ids)}"
        if not self._codec.has_tokenizer:
            return
        assert self._decode(self._ids) == full, "the kept ids do not decode to the text"
        for anchor in [_ORIGIN, *self._anchors]:
            assert 0 <= anchor.prefix <= anchor.read <= len(self._ids), anchor
            assert self._decode(self._ids[:anchor.read]) == full[:anchor.length], f"{anchor}: not a prefix of the text"
            assert anchor.context == self._decode(self._ids[anchor.prefix:anchor.read]), f"{anchor}: stale context"
        committed = full[:self._anchor.length]
        assert self._recent == (committed[-self._lookback:] if self._lookback else ""), "recent is stale"


class StopChecker:
    """SPEC §5's stop rules after each appended token, deciding as `ref.sequence.check_stop`
    does (same text, same finish_reason and stop_reason), in O(1) amortized per token."""

    def __init__(self, params: SamplingParams, prompt_len: int, ctx: StopContext):
        p = self.params = params
        self._prompt_len = prompt_len
        self._max_model_len = ctx.max_model_len
        self._max_tokens = p.max_tokens if p.max_tokens is not None else ctx.max_model_len
        self._stop_ids = frozenset(p.stop_token_ids) | frozenset(() if p.ignore_eos else ctx.eos_token_ids)
        self._longest_stop = max((len(s) for s in p.stop), default=0)
        self._detok = IncrementalDetokenizer(ctx.codec, p.skip_special_tokens, max(self._longest_stop - 1, 0))
        self._num_tokens = 0
        self._searched = False  # stop strings were searched after the previous token (none found)
        self._final_text: str | None = None  # set when the sample finishes with a trimmed text

    @property
    def text(self) -> str:
        return self._detok.text if self._final_text is None else self._final_text

    @property
    def detokenizer(self) -> IncrementalDetokenizer:
        return self._detok

    def append(self, token_id: int) -> tuple[str | None, int | str | None]:
        """Apply the rules to one more output token: (finish_reason, stop_reason), both None
        while the sample goes on. The rules, in order, as SPEC §5 and ref.sequence state them."""
        p = self.params
        self._num_tokens += 1
        if self._num_tokens >= p.min_tokens:
            if token_id in self._stop_ids:
                if p.include_stop_str_in_output:
                    self._detok.append(token_id)
                self._final_text = self._detok.text  # without it: the text before this token
                return "stop", token_id if token_id in p.stop_token_ids else None
            changed = self._detok.append(token_id)
            hit = self._find_stop_string(changed)
            if hit is not None:
                pos, stop_str = hit
                end = pos + len(stop_str) if p.include_stop_str_in_output else pos
                self._final_text = self._detok.text[:end]
                return "stop", stop_str
        else:
            self._detok.append(token_id)
        if self._num_tokens >= self._max_tokens or self._prompt_len + self._num_tokens >= self._max_model_len:
            return "length", None
        return None, None

    def _find_stop_string(self, changed: int) -> tuple[int, str] | None:
        """(position, string) of the earliest stop string in the text, ties to the first listed.
        Searched only from where an occurrence may start that the previous text did not hold."""
        if not self.params.stop:
            return None
        start = max(0, changed - self._longest_stop + 1) if self._searched else 0
        self._searched = True
        region = self._detok.text_from(start)
        best = None
        for s in self.params.stop:
            pos = region.find(s)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        return None if best is None else (start + best[0], best[1])


# ---- helpers ----------------------------------------------------------------------------------

_SKIPPED_IDS: "weakref.WeakKeyDictionary[TextCodec, frozenset[int]]" = weakref.WeakKeyDictionary()


def _skipped_ids(codec: TextCodec) -> frozenset[int]:
    """Special ids that a decode with skip_special_tokens=True provably drops: alone they decode
    to text without the flag and to nothing with it. Only a fast tokenizer drops them before its
    decoder runs (a slow one may still join texts around them), so only there are they dropped
    on arrival; an id missing here is merely decoded in the window like any other."""
    if codec.tokenizer is None or not getattr(codec.tokenizer, "is_fast", False):
        return frozenset()
    if codec not in _SKIPPED_IDS:
        special = getattr(codec.tokenizer, "all_special_ids", ())
        _SKIPPED_IDS[codec] = frozenset(
            t for t in special if codec.decode([t], True) == "" and codec.decode([t], False) != "")
    return _SKIPPED_IDS[codec]


_TOKEN_TEXTS: "weakref.WeakKeyDictionary[TextCodec, dict[int, str | None]]" = weakref.WeakKeyDictionary()


def cached_token_text(codec: TextCodec) -> Callable[[int], str | None]:
    """`codec.token_text` with a cache per codec. A token's text alone never changes, and the
    logprobs of one sampled token ask for up to max_logprobs + 1 of them (of each prompt
    position too, with prompt_logprobs): a dict hit instead of a tokenizer call each."""
    cache = _TOKEN_TEXTS.setdefault(codec, {})

    def token_text(token_id: int) -> str | None:
        if token_id not in cache:
            cache[token_id] = codec.token_text(token_id)
        return cache[token_id]

    return token_text


def _rewind_offsets(num_anchors: int) -> list[int]:
    """Which anchors a rewind tries, as offsets from the end (1 is the current one, which failed):
    2, 3, 5, 9, ... (1, 2, 4, 8 commits before it), and the oldest kept."""
    offsets, distance = [], 1
    while 1 + distance < num_anchors:
        offsets.append(1 + distance)
        distance *= 2
    return offsets + [num_anchors] if num_anchors > 1 else []


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix; O(log n) C-level comparisons of slices."""
    if b.startswith(a):  # the usual case: the text only grew
        return len(a)
    lo, hi = 0, min(len(a), len(b))  # a[:lo] == b[:lo]; a[:hi + 1] != b[:hi + 1] or hi at the end
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
