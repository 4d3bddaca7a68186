"""The `structured` tier: constrained outputs validated independently, and equal to the oracle's.

Hypothesis draws constraints a random tiny model can finish — JSON schemas (closed objects whose
properties hypothesis-jsonschema draws from `PROPERTY_META_SCHEMA`), regexes over a small ASCII
alphabet, choice lists, `json_object`, small EBNF grammars — and workloads that mix them with unconstrained
requests, the token controls (`allowed_token_ids`, `bad_words`, `logit_bias`, `min_tokens`,
`ignore_eos`), greedy, seeded and unseeded sampling and n > 1, on engines with small pools,
chunked prefill and prefix caching (so preemption and prefix hits come up). Each example runs the
workload through the engine under test and the oracle, and checks:

1. every constrained sample that must be a whole sentence (`must_be_sentence`: it finished with
   "stop" and no stop_reason — by EOS, or by SPEC §5 rule 0 with nothing but its own grammar to
   end it) validates under an independent validator (`validate`: `jsonschema` over `json.loads`,
   `re.fullmatch`, membership, a hand-written parser per grammar) — on both sides;
2. both sides obey SPEC's output rules (conformance/contract.py, rule 0 included);
3. the engine's outputs equal the oracle's under SPEC §7 (conformance/compare.py).

The validators share nothing with `ref/structured.py` (which grammar a constraint means, each
token's bytes): that shared code is what they prove.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

from hypothesis import strategies as st

from conformance.contract import ended_by_rule0

from ref.sampling_params import SamplingParams, StructuredOutputsParams

# ----------------------------------------------------------------------------- JSON schemas

# Short words of enums (a quote now and then: the grammar must escape it, the validator unescape it).
_WORD = {"type": "string", "pattern": r'^[a-z"]{1,3}$'}
_ENUM = {"type": "object", "properties": {"enum": {"type": "array", "items": _WORD, "minItems": 1, "maxItems": 3,
                                                   "uniqueItems": True}},
         "required": ["enum"], "additionalProperties": False}
_BOOLEAN = {"type": "object", "properties": {"type": {"const": "boolean"}}, "required": ["type"],
            "additionalProperties": False}
_INTEGER = {"type": "object", "properties": {"type": {"const": "integer"},
                                             "minimum": {"type": "integer", "minimum": -20, "maximum": 0},
                                             "maximum": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["type"], "additionalProperties": False}
# minLength <= 1 <= maxLength: never a minimum above the maximum (an uncompilable schema).
# (xgrammar 0.2.9 reads a string with minLength/maxLength as characters other than '"' and '\\':
# no escape sequence, but raw control characters, which strict JSON forbids; see `validate`.)
_STRING = {"type": "object", "properties": {"type": {"const": "string"},
                                            "minLength": {"type": "integer", "minimum": 0, "maximum": 1},
                                            "maxLength": {"type": "integer", "minimum": 1, "maximum": 4}},
           "required": ["type", "maxLength"], "additionalProperties": False}
_SCALAR = {"anyOf": [_ENUM, _BOOLEAN, _INTEGER, _STRING]}
_ARRAY = {"type": "object", "properties": {"type": {"const": "array"}, "items": _SCALAR,
                                           "maxItems": {"type": "integer", "minimum": 0, "maximum": 2}},
          "required": ["type", "items", "maxItems"], "additionalProperties": False}
# A property's schema: an enum of short strings, a boolean, a small integer range, a short
# string, or an array of at most 2 of those.
PROPERTY_META_SCHEMA = {"anyOf": [_SCALAR, _ARRAY]}
PROPERTY_NAME = {"type": "string", "pattern": "^[a-z]{1,4}$"}


def json_schemas() -> st.SearchStrategy[dict]:
    """Schemas of objects with 1-3 properties (drawn by hypothesis-jsonschema from
    `PROPERTY_META_SCHEMA`), every one required, in schema order, and no other allowed — so a
    sentence is short and a random model can end it. (One meta-schema of the whole object would
    do, but hypothesis-jsonschema re-canonicalises its `anyOf` for every property drawn: 0.2 s
    a schema; drawing the properties from one strategy built once is 10x faster.)"""
    from_schema = _from_schema()
    properties = st.dictionaries(from_schema(PROPERTY_NAME), from_schema(PROPERTY_META_SCHEMA), min_size=1,
                                 max_size=3)
    return properties.map(lambda props: {"type": "object", "properties": props, "required": list(props),
                                         "additionalProperties": False})


class _ManyWithMore:
    """hypothesis-jsonschema 0.23.1 (the latest) draws an object's properties with Hypothesis's
    private `many(...)` through `.more()`; Hypothesis 6.16x replaced that with a context manager
    iterated by `for _ in elements`. This is the old interface on the new one: enter at once,
    `more()` steps the iterator and leaves the context when it ends (the only way that loop ends
    without an exception; on one, the example is being discarded)."""

    def __init__(self, data, min_size, max_size, average_size):
        from hypothesis.internal.conjecture.utils import many

        self._many = many(data, min_size=min_size, max_size=max_size, average_size=average_size)
        self._many.__enter__()
        self._steps = iter(self._many)

    def more(self) -> bool:
        try:
            next(self._steps)
            return True
        except StopIteration:
            self._many.__exit__(None, None, None)
            return False

    def reject(self, why: str | None = None) -> None:
        self._many.reject(why)


def _from_schema():
    """hypothesis_jsonschema.from_schema, on this Hypothesis (`_ManyWithMore` where needed)."""
    import types

    import hypothesis_jsonschema._from_schema as hjs
    from hypothesis.internal.conjecture import utils

    if not hasattr(utils.many, "more") and not isinstance(hjs.cu, types.SimpleNamespace):
        hjs.cu = types.SimpleNamespace(**{**vars(utils), "many": _ManyWithMore})
    return hjs.from_schema


# ----------------------------------------------------------------------------- regexes

# Characters the tiny model's vocabulary spells alone and in merges ("he", "in", "Ġt", "Ġthe"...).
REGEX_CHARS = "abehint 01"
_CLASSES = ("[a-e]", "[0-9]", "[ht]", "[a-c0-2]", "[ ei]", r"\d", r"[.(]")
_ESCAPED = (r"\.", r"\(", r"\)")  # literals that are regex syntax unescaped


@st.composite
def _regex_piece(draw, depth: int) -> str:
    kind = draw(st.sampled_from(["char", "char", "class", "group", "escaped"] if depth < 2 else ["char", "class"]))
    if kind == "char":
        atom = draw(st.sampled_from(REGEX_CHARS))
    elif kind == "escaped":
        atom = draw(st.sampled_from(_ESCAPED))
    elif kind == "class":
        atom = draw(st.sampled_from(_CLASSES))
    else:
        branches = draw(st.lists(_regex_concat(depth + 1), min_size=1, max_size=3))
        atom = "(" + "|".join(branches) + ")"
    lo = draw(st.integers(0, 2))
    quantifier = draw(st.sampled_from(["", "", "?", f"{{{lo}}}", f"{{{lo},{lo + draw(st.integers(0, 2))}}}"]))
    if quantifier in ("{0}", "{0,0}"):  # matches only "": a piece worth nothing
        quantifier = ""
    return atom + quantifier


@st.composite
def _regex_concat(draw, depth: int) -> str:
    return "".join(draw(st.lists(_regex_piece(depth), min_size=1, max_size=3 if depth else 4)))


def regexes() -> st.SearchStrategy[str]:
    """Literals, classes, groups with alternation, ?, {m} and {m,n}: every sentence is short."""
    return _regex_concat(0)


# ----------------------------------------------------------------------------- choices

# A quote and a backslash (the choice grammar must escape them) and a two-byte character.
_CHOICE_WORD = st.text(alphabet='abehint "\\é', min_size=1, max_size=5)


@st.composite
def choice_lists(draw) -> list[str]:
    """1-4 distinct short strings, often one a prefix of another ("a", "ab") or sharing one."""
    words = [draw(_CHOICE_WORD)]
    for _ in range(draw(st.integers(0, 3))):
        base = draw(st.sampled_from(words))
        how = draw(st.sampled_from(["extend", "share", "new"]))
        if how == "extend":
            word = base + draw(_CHOICE_WORD)
        elif how == "share":
            word = base[: draw(st.integers(0, len(base)))] + draw(_CHOICE_WORD)
        else:
            word = draw(_CHOICE_WORD)
        if word not in words:
            words.append(word)
    return words


# ----------------------------------------------------------------------------- grammars

@dataclass(frozen=True)
class Grammar:
    """An xgrammar EBNF grammar and an independent test of its sentences."""

    name: str
    ebnf: str
    accepts: Callable[[str], bool]


def _arithmetic(text: str) -> bool:
    """expr ::= term (("+" | "-") term)* ; term ::= [0-9] [0-9]? | "(" expr ")" — by recursive descent."""
    pos = 0

    def term() -> bool:
        nonlocal pos
        if pos < len(text) and text[pos] == "(":
            pos += 1
            if not expr() or pos >= len(text) or text[pos] != ")":
                return False
            pos += 1
            return True
        start = pos
        while pos < len(text) and text[pos].isdigit() and text[pos].isascii() and pos - start < 2:
            pos += 1
        return pos > start

    def expr() -> bool:
        nonlocal pos
        if not term():
            return False
        while pos < len(text) and text[pos] in "+-":
            pos += 1
            if not term():
                return False
        return True

    return expr() and pos == len(text)


def _nested_list(text: str) -> bool:
    """list ::= "[" (item ("," item)*)? "]" ; item ::= "x" | list — by recursive descent."""
    pos = 0

    def item() -> bool:
        nonlocal pos
        if text.startswith("x", pos):
            pos += 1
            return True
        return lst()

    def lst() -> bool:
        nonlocal pos
        if not text.startswith("[", pos):
            return False
        pos += 1
        if text.startswith("]", pos):
            pos += 1
            return True
        if not item():
            return False
        while text.startswith(",", pos):
            pos += 1
            if not item():
                return False
        if not text.startswith("]", pos):
            return False
        pos += 1
        return True

    return lst() and pos == len(text)


def _pairs(keys: str, values: tuple[str, ...]) -> Grammar:
    """Comma-separated key=value pairs: a regular language, tested with Python's `re`."""
    value = " | ".join(json.dumps(v) for v in values)
    ebnf = f'root ::= pair ("," pair)*\npair ::= [{keys}]+ "=" ({value})'
    pair = f"[{keys}]+=(?:{'|'.join(re.escape(v) for v in values)})"
    pattern = re.compile(f"{pair}(?:,{pair})*")
    return Grammar(f"pairs[{keys}]={'|'.join(values)}", ebnf, lambda text: pattern.fullmatch(text) is not None)


ARITHMETIC = Grammar("arithmetic", 'root ::= expr\nexpr ::= term (("+" | "-") term)*\n'
                                   'term ::= [0-9] [0-9]? | "(" expr ")"', _arithmetic)
NESTED_LIST = Grammar("nested_list", 'root ::= "[" (item ("," item)*)? "]"\nitem ::= "x" | root', _nested_list)


def grammars() -> st.SearchStrategy[Grammar]:
    pairs = st.builds(_pairs, st.sampled_from(["a-c", "ht", "ei"]),
                      st.lists(st.sampled_from(["yes", "no", "1", "the", "in"]), min_size=1, max_size=3,
                               unique=True).map(tuple))
    return st.one_of(st.just(ARITHMETIC), st.just(NESTED_LIST), pairs)


def _grammar_of(ebnf: str) -> Grammar:
    """The validator of a grammar text the tier draws (`grammars`)."""
    for g in (ARITHMETIC, NESTED_LIST):
        if g.ebnf == ebnf:
            return g
    head = 'root ::= pair ("," pair)*\npair ::= ['
    if not ebnf.startswith(head):
        raise ValueError(f"no validator for the grammar {ebnf!r}")
    keys, values = ebnf[len(head):].split(']+ "=" (', 1)
    return _pairs(keys, tuple(json.loads(v) for v in values[:-1].split(" | ")))


# ----------------------------------------------------------------------------- constraints

KINDS = StructuredOutputsParams.KINDS  # json, regex, choice, grammar, json_object


# The kinds drawn, JSON schemas most, grammars and any JSON object now and then; interleaved,
# since Hypothesis favours the first entries of a `sampled_from` (and shrinks towards them).
KIND_DRAWS = ("json", "regex", "choice", "json", "json_object", "grammar", "json", "choice", "regex", "json")


@st.composite
def constraints(draw) -> StructuredOutputsParams:
    """A constraint of a kind drawn from `KIND_DRAWS` (a JSON schema as a dict or as its text)."""
    kind = draw(st.sampled_from(KIND_DRAWS))
    if kind in ("json", "json_object"):
        no_ws = draw(st.booleans())
        if kind == "json_object":
            return StructuredOutputsParams(json_object=True, disable_any_whitespace=no_ws)
        schema = draw(json_schemas())
        return StructuredOutputsParams(json=json.dumps(schema) if draw(st.booleans()) else schema,
                                       disable_any_whitespace=no_ws)
    if kind == "regex":
        return StructuredOutputsParams(regex=draw(regexes()))
    if kind == "choice":
        return StructuredOutputsParams(choice=draw(choice_lists()))
    return StructuredOutputsParams(grammar=draw(grammars()).ebnf)


# ----------------------------------------------------------------------------- validators

def validate(so: StructuredOutputsParams, text: str) -> str | None:
    """None if `text` is a sentence of the constraint, else why not — with no code of `ref/` or
    xgrammar: `jsonschema`, `re.fullmatch`, membership, or the grammar's own parser.

    JSON is parsed with `strict=False`: xgrammar 0.2.9's strings with minLength/maxLength admit
    raw control characters (U+0000-U+001F), which RFC 8259 wants escaped; that is all
    `strict=False` lets through. With `disable_any_whitespace` the text must also be in the
    compact layout (`compact_layout`)."""
    kind = so.kind
    if kind in ("json", "json_object"):
        try:
            value = json.loads(text, strict=False)
        except ValueError as err:
            return f"not JSON: {err}"
        if so.disable_any_whitespace and (why := compact_layout(text)) is not None:
            return why
        if kind == "json_object":
            return None if isinstance(value, dict) else f"JSON {type(value).__name__}, not an object"
        import jsonschema

        schema = json.loads(so.json) if isinstance(so.json, str) else so.json
        try:
            jsonschema.validate(value, schema)
        except jsonschema.ValidationError as err:
            return f"fails the schema: {err.message}"
        return None
    if kind == "regex":
        return None if re.fullmatch(so.regex, text) is not None else f"does not match /{so.regex}/ in full"
    if kind == "choice":
        return None if text in so.choice else f"is not one of {so.choice}"
    return None if _grammar_of(so.grammar).accepts(text) else "is not a sentence of the grammar"


def compact_layout(text: str) -> str | None:
    """None if the JSON text's whitespace outside strings is exactly one space after each ',' and
    ':' and nowhere else — the layout xgrammar gives `disable_any_whitespace` (json.dumps'
    default separators) — else where it is not."""
    in_string = escaped = False
    for pos, ch in enumerate(text):
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
            continue
        if ch == '"':
            in_string = True
        elif ch in ",:" and not text.startswith(" ", pos + 1):
            return f"no space after {ch!r} at {pos} (disable_any_whitespace: ', ' and ': ')"
        elif ch.isspace() and not (ch == " " and pos > 0 and text[pos - 1] in ",:"):
            return f"whitespace {ch!r} at {pos} outside a string (disable_any_whitespace: ', ' and ': ' only)"
    return None


def must_be_sentence(params: SamplingParams, completion, eos_token_ids: tuple[int, ...]) -> bool:
    """A constrained sample whose text SPEC guarantees to be a whole sentence: it finished with
    "stop" and no stop_reason (not a stop string or stop token), so either EOS ended it (which
    its grammar allows only after a whole sentence) or SPEC §5 rule 0 did — and then, unless
    `allowed_token_ids` or `bad_words` may have taken the grammar's tokens away, only because
    the grammar allowed nothing but EOS (held back by min_tokens, or already taken under
    ignore_eos). Samples that stopped for length, or on a stop string or token, may be cut short."""
    if params.structured_outputs is None or completion.finish_reason != "stop" or completion.stop_reason is not None:
        return False
    ids = completion.token_ids
    if ids and ids[-1] in eos_token_ids:
        return True
    return params.allowed_token_ids is None and params.bad_words is None


def check_sentences(label: str, params: list[SamplingParams], outputs: dict[int, Any], eos_token_ids: tuple[int, ...],
                    sentence_of: Callable[[Any], str]) -> int:
    """Validate every sample that must be a sentence (`must_be_sentence`); `sentence_of(sample)`
    is its output as the grammar saw it (`TokenBytes.sentence`). Raises naming the request, the
    sample, the constraint and the text. Returns how many were validated."""
    validated = 0
    for i, out in sorted(outputs.items()):
        p = params[i]
        for c in out.outputs:
            if not must_be_sentence(p, c, eos_token_ids):
                continue
            why = validate(p.structured_outputs, sentence_of(c))
            if why is not None:
                raise AssertionError(
                    f"{label} request {i} sample {c.index}: {p.structured_outputs.kind} output {c.text!r} "
                    f"(finish_reason 'stop', {len(c.token_ids)} tokens {list(c.token_ids)[-8:]} at the end) {why}; "
                    f"constraint {_describe_constraint(p.structured_outputs)}")
            validated += 1
    return validated


def _describe_constraint(so: StructuredOutputsParams) -> str:
    spec = getattr(so, so.kind)
    text = spec if isinstance(spec, str) else json.dumps(spec)
    return f"{so.kind}={text[:300]!s}" + (" (disable_any_whitespace)" if so.disable_any_whitespace else "")


class TokenBytes:
    """Each token's bytes, read from the checkpoint's tokenizer.json with no code of `ref/` (a
    byte-level BPE: GPT-2's byte alphabet; special tokens have none), to validate an output as
    the bytes its grammar took (SPEC: a constraint is a language over the output's bytes).

    Why not `text`: xgrammar's JSON strings admit the UTF-8 form of surrogate code points
    (bytes ED A0 80 - ED BF BF), which are not UTF-8, so the detokenizer shows each as three
    U+FFFD and a string of maxLength 2 can read as six characters. Decoded with "surrogatepass",
    such a byte sequence is the one character the grammar counted. Any other invalid UTF-8 is
    still a failure. A tokenizer of another kind: `text` is validated (`sentence` falls back)."""

    def __init__(self, table: dict[int, bytes] | None):
        self.table = table

    @classmethod
    def from_model_dir(cls, model_dir: str) -> "TokenBytes":
        from pathlib import Path

        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            return cls(None)
        spec = json.loads(path.read_text())
        if (spec.get("decoder") or {}).get("type") != "ByteLevel" or spec["model"].get("type") != "BPE":
            return cls(None)
        byte_of = {ch: b for b, ch in _gpt2_byte_alphabet().items()}
        special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        table = {}
        for piece, token in spec["model"]["vocab"].items():
            if token in special:
                table[token] = b""
            elif all(ch in byte_of for ch in piece):
                table[token] = bytes(byte_of[ch] for ch in piece)
        return cls(table)

    def sentence(self, completion) -> str:
        """The sample's output as its grammar read it: its tokens' bytes, surrogates passed
        (the `text` itself where the bytes are unknown)."""
        if self.table is None or any(t not in self.table for t in completion.token_ids):
            return completion.text
        raw = b"".join(self.table[t] for t in completion.token_ids)
        try:
            return raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as err:
            raise AssertionError(f"sample {completion.index}: its bytes {raw!r} are not UTF-8 ({err}), "
                                 f"which no grammar of SPEC's constraints admits") from None


def _gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE vocabularies spell bytes so)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(rest)}}


# ----------------------------------------------------------------------------- SPEC's output rules

# ----------------------------------------------------------------------------- workloads

# Most tokens a constrained request may generate, by kind: room for a sentence of that kind (with
# any whitespace, a JSON sentence takes ~3x its compact length), and now and then too little.
MAX_TOKENS = {"choice": 10, "regex": 20, "grammar": 32, "json": 64, "json_object": 32}
# Words for bad_words: single letters and merges of the tiny model's vocabulary, a two-token word.
BAD_WORDS = ("a", "e", "the", "in", "1", "b c", '"', "he")
# Prompt lengths: short (1-24 tokens), so that an output has room in max_model_len; in one
# workload of three long (40-72), so that two requests overflow the smallest pools (one
# max_model_len request) and get preempted (a constrained output may then meet max_model_len).
PROMPT_LEN, LONG_PROMPT_LEN = (1, 24), (40, 72)


def with_fields(params: SamplingParams, **fields: Any) -> SamplingParams:
    """The same request with some fields changed (re-validated)."""
    return SamplingParams(**{**params.__dict__, **fields})


@st.composite
def token_controls(draw, vocab: int, eos: tuple[int, ...], constrained: bool, whitespace: tuple[int, ...] = ()) -> dict:
    """Now and then allowed_token_ids, bad_words, logit_bias (on a constrained request, most often
    a push towards EOS, which its grammar allows only after a whole sentence, and away from the
    `whitespace` tokens, which JSON allows anywhere and a random model would repeat)."""
    kw: dict[str, Any] = {}
    token = st.integers(0, vocab - 1)
    if draw(st.integers(0, 7)) == 0:
        allowed = draw(st.lists(token, min_size=1, max_size=draw(st.sampled_from([3, 40, 200]))))
        kw["allowed_token_ids"] = allowed + (list(eos) if draw(st.booleans()) else [])
    if draw(st.integers(0, 5)) == 0:
        kw["bad_words"] = draw(st.lists(st.sampled_from(BAD_WORDS), min_size=1, max_size=3, unique=True))
    choice = draw(st.integers(0, 5))
    if constrained and choice < 2:
        kw["logit_bias"] = {eos[0]: draw(st.sampled_from([5.0, 30.0]))} if eos else {}
        if draw(st.booleans()):
            kw["logit_bias"].update({t: -5.0 for t in whitespace})
    elif choice == 2:
        kw["logit_bias"] = draw(st.dictionaries(token, st.sampled_from([-100.0, -3.0, 2.5, 100.0]), min_size=1,
                                                max_size=4))
    return kw


@st.composite
def constrained_params(draw, vocab: int, eos: tuple[int, ...], whitespace: tuple[int, ...] = ()):
    """A request under a drawn constraint: greedy, seeded (n up to 3) or unseeded; a max_tokens
    sized for its kind (a third of the time a quarter of it: a sentence cut short); now and then
    min_tokens, ignore_eos, penalties, logprobs, stops and the token controls."""
    so = draw(constraints())
    most = MAX_TOKENS[so.kind]
    kw: dict[str, Any] = dict(structured_outputs=so, max_tokens=draw(st.sampled_from([most, max(1, most // 4), most])))
    how = draw(st.sampled_from(["greedy", "seeded", "seeded", "unseeded"]))
    if how == "greedy":
        kw["temperature"] = 0.0
    else:
        kw.update(temperature=draw(st.sampled_from([0.6, 1.0, 1.5])), top_k=draw(st.sampled_from([0, 0, 5, 50])),
                  top_p=draw(st.sampled_from([1.0, 1.0, 0.9])), n=draw(st.sampled_from([1, 1, 2, 3])),
                  seed=draw(st.integers(0, 2**32)) if how == "seeded" else None)
    if draw(st.integers(0, 5)) == 0:  # min_tokens past a short sentence: rule 0 holds EOS back
        kw["min_tokens"] = draw(st.integers(1, kw["max_tokens"]))
    if draw(st.integers(0, 5)) == 0:
        kw["ignore_eos"] = True
    if draw(st.integers(0, 5)) == 0:
        kw.update(repetition_penalty=draw(st.sampled_from([1.2, 0.8])),
                  frequency_penalty=draw(st.sampled_from([0.0, 0.5])),
                  presence_penalty=draw(st.sampled_from([0.0, -0.5])))
    if draw(st.integers(0, 5)) == 0:
        kw["logprobs"] = draw(st.integers(0, 3))
    if draw(st.integers(0, 7)) == 0:
        kw["stop"] = draw(st.lists(st.sampled_from(['"', "a", "1", " "]), min_size=1, max_size=2))
    if draw(st.integers(0, 9)) == 0:
        kw["stop_token_ids"] = draw(st.lists(st.integers(3, vocab - 1), min_size=1, max_size=2))
    return SamplingParams(**kw, **draw(token_controls(vocab, eos, constrained=True, whitespace=whitespace)))


@st.composite
def structured_workloads(draw, vocab: int = 512, eos: tuple[int, ...] = (2,), max_requests: int = 6,
                         whitespace: tuple[int, ...] = ()):
    """Constrained requests (three in four) among unconstrained ones (the e2e tier's requests,
    now and then with token controls), prompts sharing prefixes (prefix-cache hits), long in one
    workload of three (`LONG_PROMPT_LEN`: preemption), priorities, and now and then an abort; at
    least one request is constrained."""
    from conformance.workloads import Workload, sampling_params_strategy

    token = st.integers(3, vocab - 1)

    def tokens(lo: int, hi: int) -> list[int]:
        n = draw(st.integers(lo, hi))
        return draw(st.lists(token, min_size=n, max_size=n))

    shortest, longest = LONG_PROMPT_LEN if draw(st.integers(0, 2)) == 0 else PROMPT_LEN
    prefixes = [tokens(4, longest - 4) for _ in range(draw(st.integers(1, 2)))]
    num = draw(st.integers(1, max_requests))
    constrained_at = draw(st.integers(0, num - 1))
    prompts, params = [], []
    for i in range(num):
        prefix = draw(st.sampled_from([[], *prefixes]))
        prompts.append({"prompt_token_ids": prefix + tokens(max(0, shortest - len(prefix)), longest - len(prefix))})
        if i == constrained_at or draw(st.integers(0, 3)) > 0:
            params.append(draw(constrained_params(vocab, eos, whitespace)))
        else:
            p = draw(sampling_params_strategy(max_tokens=16, vocab=vocab))
            params.append(with_fields(p, **draw(token_controls(vocab, eos, constrained=False))))
    priorities = [draw(st.integers(0, 3)) for _ in range(num)]
    aborts = {draw(st.integers(1, 6)): [draw(st.integers(0, num - 1))]} if draw(st.integers(0, 5)) == 0 else {}
    return Workload(prompts, params, priorities, aborts)


# ----------------------------------------------------------------------------- the check

# Examples that must reach each feature, in the quick profile (full: x2, deep: x5, as e2e's).
# The targeted cases (`targeted_cases`) reach each once by construction; drawn examples add more.
STRUCTURED_MINIMUMS = {
    **{f"structured:{k}": 1 for k in KINDS},
    # a whole sentence validated: EOS (or rule 0) ended it, on the engine's side
    **{f"validated:{k}": 1 for k in KINDS if k != "json_object"},
    "n>1:structured": 1, "greedy:structured": 1, "seeded:structured": 1, "rule0": 1, "rule0:no_token": 1,
    "mixed": 1, "allowed_token_ids": 1, "bad_words": 1, "logit_bias": 1, "min_tokens:structured": 1,
    "ignore_eos:structured": 1,
}
# Only an engine the suite drives step by step, with its options drawn, shows these: preemption,
# a prefix-cache hit, a prompt computed in chunks — each in an example with a constrained request.
STRUCTURED_ENGINE_MINIMUMS = {"preemption:structured": 1, "prefix_hit:structured": 1, "chunked:structured": 1}
# Not scaled with the profile: a random model seldom closes an arbitrary JSON object (its keys
# and strings are unbounded), so drawn examples rarely add to the targeted case's one.
STRUCTURED_FIXED_MINIMUMS = {"validated:json_object": 1}


def structured_minimums(profile: str, engine_metrics: bool) -> dict[str, int]:
    from conformance.coverage import PROFILE_SCALE

    scale = PROFILE_SCALE.get(profile, 1)
    wanted = {**STRUCTURED_MINIMUMS, **(STRUCTURED_ENGINE_MINIMUMS if engine_metrics else {})}
    return {**{k: v * scale for k, v in wanted.items()}, **STRUCTURED_FIXED_MINIMUMS}


def example_features(workload, got: dict, options: dict, eos: tuple[int, ...]) -> set[str]:
    """What one example exercised, from its requests, the engine's outputs and its options."""
    feats: set[str] = set()
    constrained = [i for i in got if workload.params[i].structured_outputs is not None]
    if constrained and len(constrained) < len(got):
        feats.add("mixed")
    for i, out in got.items():
        p = workload.params[i]
        for name in ("allowed_token_ids", "bad_words", "logit_bias"):
            if getattr(p, name):
                feats.add(name)
        if p.structured_outputs is None:
            continue
        kind = p.structured_outputs.kind
        feats.add(f"structured:{kind}")
        feats.add("greedy:structured" if p.greedy else "seeded:structured" if p.seed is not None
                  else "unseeded:structured")
        if p.n > 1:
            feats.add("n>1:structured")
        if p.min_tokens:
            feats.add("min_tokens:structured")
        if p.ignore_eos:
            feats.add("ignore_eos:structured")
        for c in out.outputs:
            if must_be_sentence(p, c, eos):
                feats.add(f"validated:{kind}")
            if ended_by_rule0(p, c, eos):
                feats.add("rule0" if c.token_ids else "rule0:no_token")
        budget = options.get("max_num_batched_tokens")
        if options.get("enable_chunked_prefill", True) and budget and len(out.prompt_token_ids) > budget:
            feats.add("chunked:structured")
    return feats


def tallies(workload, got: dict, eos: tuple[int, ...]) -> dict[str, int]:
    """Constrained samples by how they ended (totals over the run, not examples)."""
    counts: dict[str, int] = {}
    for i, out in got.items():
        p = workload.params[i]
        if p.structured_outputs is None:
            continue
        for c in out.outputs:
            key = ("total:validated" if must_be_sentence(p, c, eos) else
                   "total:length" if c.finish_reason == "length" else "total:stopped_short")
            counts[key] = counts.get(key, 0) + 1
    return counts


def _preemption_case(vocab: int, e: int, copy: int) -> tuple[Any, dict]:
    """Three 40-token prompts with 15+ constrained tokens each, in a pool of one max-length
    request's blocks, so that a constrained sample is preempted and recomputed: a seeded n = 2
    fork, a greedy one, one pushed to EOS. The constraint forces a sentence of 30 characters: a
    regex (even copies) or a JSON enum (odd copies); each copy has its own prompts and seeds."""
    from conformance.tiers import MAX_MODEL_LEN
    from conformance.workloads import Workload

    prompts = [{"prompt_token_ids": [3 + (7 * i + 11 * k + 13 * copy) % (vocab - 3) for k in range(40)]}
               for i in range(3)]
    if copy % 2 == 0:
        so = StructuredOutputsParams(regex="(abc|bca|cab){10}")
    else:
        so = StructuredOutputsParams(json={"type": "object", "properties": {"w": {"enum": ["the ant", "in the hat"]},
                                                                           "v": {"enum": ["a bee then", "he bit"]}},
                                           "required": ["w", "v"], "additionalProperties": False},
                                     disable_any_whitespace=True)
    workload = Workload(prompts, [
        SamplingParams(structured_outputs=so, n=2, temperature=1.0, seed=3 + copy, max_tokens=40),
        SamplingParams(structured_outputs=so, temperature=0, max_tokens=40),
        SamplingParams(structured_outputs=so, temperature=0.8, seed=9 + copy, max_tokens=40, logit_bias={e: 30.0}),
    ], [0, 0, 0])
    return workload, dict(max_model_len=MAX_MODEL_LEN, block_size=8, num_kv_blocks=MAX_MODEL_LEN // 8,
                          max_num_seqs=4, max_num_batched_tokens=64)


def _chunked_case(vocab: int, e: int, copy: int) -> tuple[Any, dict]:
    """Chunks of 8 prompt tokens, one request at a time, over a shared 33-token prefix: the
    second and third hit the first's cached blocks; JSON (in the compact layout, n = 3), a
    choice and a grammar (n = 2). Each copy has its own prefix and seeds."""
    from conformance.tiers import MAX_MODEL_LEN
    from conformance.workloads import Workload

    shared = [4 + (5 * k + 17 * copy) % (vocab - 4) for k in range(33)]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                              "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    workload = Workload([{"prompt_token_ids": shared + [7, 8, 9]}, {"prompt_token_ids": shared + [9, 8]},
                         {"prompt_token_ids": shared + [5]}], [
        SamplingParams(structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=True),
                       temperature=1.0, seed=1 + copy, n=3, max_tokens=40, logit_bias={e: 30.0}),
        SamplingParams(structured_outputs=StructuredOutputsParams(choice=["the", "then", "a b"]), temperature=0,
                       max_tokens=8),
        SamplingParams(structured_outputs=StructuredOutputsParams(grammar=ARITHMETIC.ebnf), temperature=1.0,
                       seed=2 + copy, n=2, max_tokens=24, logit_bias={e: 30.0}),
    ], [0, 0, 0])
    return workload, dict(max_model_len=MAX_MODEL_LEN, block_size=8, num_kv_blocks=48, max_num_seqs=1,
                          max_num_batched_tokens=8)


def targeted_cases(vocab: int, eos: tuple[int, ...], token_id: Callable[[str], int | None],
                   copies: int = 1) -> list[tuple[Any, dict]]:
    """Cases every run exercises, each reaching by construction what drawn workloads reach on
    some draws only: `copies` (the profile's scale) of a preemption case and of a chunked
    prefill case with prefix hits, then one case of rule 0 and the token controls
    (`token_id(text)`: the model's one token spelling `text`, for a bias that pushes an output
    to its shortest sentence). Engine options are for an engine the suite drives (ignored
    otherwise)."""
    from conformance.tiers import MAX_MODEL_LEN
    from conformance.workloads import Workload

    e = eos[0] if eos else 2

    def push(*texts: str) -> dict[int, float]:
        return {e: 30.0, **{t: 30.0 for t in map(token_id, texts) if t is not None}}

    # 3. Rule 0 and the token controls, all prefilled in one step: a seeded n = 2 fork beside
    #    other constrained samples (the scheduler and the workers may list a step's sampling rows
    #    in different orders); min_tokens holding EOS back after a whole choice; EOS taken under
    #    ignore_eos; allowed_token_ids the grammar never allows (no token at all); json_object and
    #    a grammar pushed to their shortest sentence; unconstrained: bad_words, a two-token bad
    #    word whose first token ends the prompt (only the output counts), logit_bias beside a
    #    repetition penalty (bias first: (l + 40) / 2 < 30 picks the unseen token),
    #    allowed_token_ids on a seeded fork, and a bad word a seeded sample is pushed towards.
    b, c, t, u = (token_id(x) for x in ("b", " c", "e", "a"))
    base = [[10 + i, 20 + i, 30 + i] for i in range(11)]
    if b is not None:
        base[7] = base[7] + [b]
    if t is not None:
        base[8] = base[8] + [t]
    rule0 = Workload([{"prompt_token_ids": ids} for ids in base], [
        SamplingParams(structured_outputs=StructuredOutputsParams(choice=["the", "then", "he"]), temperature=1.0,
                       seed=6, n=2, max_tokens=10),
        SamplingParams(structured_outputs=StructuredOutputsParams(choice=["ab", "b"]), temperature=0, max_tokens=10,
                       min_tokens=10),
        SamplingParams(structured_outputs=StructuredOutputsParams(choice=["in", "e"]), temperature=0, max_tokens=10,
                       ignore_eos=True, logit_bias={e: 30.0}),
        SamplingParams(structured_outputs=StructuredOutputsParams(regex="[a-c]+"), temperature=0, max_tokens=10,
                       allowed_token_ids=[3, 4, 5]),
        SamplingParams(structured_outputs=StructuredOutputsParams(json_object=True, disable_any_whitespace=True),
                       temperature=0, max_tokens=10, logit_bias=push("}")),
        SamplingParams(structured_outputs=StructuredOutputsParams(grammar=NESTED_LIST.ebnf), temperature=0,
                       max_tokens=10, logit_bias=push("]")),
        SamplingParams(temperature=0, max_tokens=8, bad_words=["the", "a"], logit_bias={vocab - 1: 5.0, 3: -100.0}),
        SamplingParams(temperature=0, max_tokens=3, bad_words=["b c"], logit_bias={} if c is None else {c: 100.0}),
        SamplingParams(temperature=0, max_tokens=2, repetition_penalty=2.0,
                       logit_bias={k: v for k, v in ((t, 40.0), (u, 30.0)) if k is not None}),
        SamplingParams(temperature=1.0, seed=4, n=2, max_tokens=8, allowed_token_ids=list(range(60, 100))),
        SamplingParams(temperature=1.0, seed=5, max_tokens=4, bad_words=["e"],
                       logit_bias={} if t is None else {t: 10.0}),
    ], [0] * len(base))
    return [case for copy in range(copies) for case in (_preemption_case(vocab, e, copy), _chunked_case(vocab, e, copy))
            ] + [(rule0, dict(max_model_len=MAX_MODEL_LEN))]


def _token_lookup(model_dir: str) -> Callable[[str], int | None]:
    """`text` -> the model's one token that spells it (None: not one token, or no tokenizer)."""
    from pathlib import Path

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return lambda text: None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))

    def token_id(text: str) -> int | None:
        ids = tok.encode(text, add_special_tokens=False).ids
        return ids[0] if len(ids) == 1 else None

    return token_id


def compare_with_oracle(ctx, workload, got: dict) -> dict:
    """Both sides obey SPEC's output rules (conformance/contract.py, rule 0 included), then the
    engine's outputs equal the oracle's under SPEC §7, as the e2e tier compares them. Returns the
    oracle's outputs by request index."""
    from conformance.tiers import _compare

    return _compare(ctx, workload, got)


def build_structured(ctx):
    """Drawn constraints in drawn workloads: every sample that must be a whole sentence validates
    independently (engine and oracle alike), and the engine equals the oracle (SPEC §6
    "Structured output", §7). Targeted cases first (`targeted_cases`)."""
    from conformance.compare import check_outputs_complete
    from conformance.coverage import Coverage, metric_features, option_features
    from conformance.driver import run_workload
    from conformance.driver import run_targeted
    from conformance.tiers import MAX_MODEL_LEN, NotApplicable, _requests, _vocab
    from conformance.workloads import fast_engine_options

    probe = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a"]))
    why_not = getattr(ctx.adapter, "unsupported", lambda p: None)(probe)
    if why_not is not None:
        raise NotApplicable(f"the engine cannot run constrained requests: {why_not}")
    if ctx.rules.decode is None:
        raise NotApplicable("the model has no tokenizer, so no request can be constrained (SPEC §4)")
    p = ctx.profile
    vocab, eos = _vocab(ctx.model_dir), tuple(ctx.rules.eos_token_ids)
    token_bytes = TokenBytes.from_model_dir(ctx.model_dir)
    token_id = _token_lookup(ctx.model_dir)
    whitespace = tuple(t for t in map(token_id, (" ", "  ", "\n", "\t")) if t is not None)
    make_engine = getattr(ctx.adapter, "make_engine", None)
    kv_is_empty = getattr(ctx.adapter, "kv_is_empty", None)
    use_engine = make_engine is not None and getattr(ctx.adapter, "name", "") in ("fast", "fast-tp2")
    filtered = any(getattr(ctx.adapter, h, None) is not None for h in ("unsupported", "comparable"))
    coverage = Coverage(minimums={} if filtered else structured_minimums(p.name, use_engine))

    def body(ctx, case):
        workload, options = case
        features = option_features(options) if use_engine else set()
        if use_engine:
            engine = make_engine(**options)
            got = run_workload(engine, workload)  # every request finished, reported once
            if kv_is_empty is not None:
                assert kv_is_empty(engine), "KV blocks leaked after the workload finished"
            metrics = metric_features(engine.get_metrics())
        else:
            workload = ctx.supported(workload, vs_oracle=True)
            outs = ctx.adapter.generate(workload.prompts, workload.params)
            check_outputs_complete(_requests(workload), outs)
            got, metrics = dict(enumerate(outs)), set()
        expected = compare_with_oracle(ctx, workload, got)
        check_sentences("engine", workload.params, got, eos, token_bytes.sentence)
        check_sentences("oracle", workload.params, expected, eos, token_bytes.sentence)
        features |= example_features(workload, got, options, eos)
        if any(workload.params[i].structured_outputs is not None for i in got):
            features |= metrics | {f"{m}:structured" for m in metrics}
        coverage.record(features)
        coverage.counts.update(tallies(workload, got, eos))

    body.coverage = coverage
    from conformance.coverage import PROFILE_SCALE

    targeted = targeted_cases(vocab, eos, token_id, copies=PROFILE_SCALE.get(p.name, 1))
    run_targeted(ctx, body, [(w, options if use_engine else {}) for w, options in targeted], "structured")
    body.targeted = len(targeted)
    wl = structured_workloads(vocab, eos, max_requests=min(5, p.max_requests), whitespace=whitespace)
    if use_engine:
        return st.tuples(wl, fast_engine_options(MAX_MODEL_LEN)), body
    return st.tuples(wl.map(lambda w: type(w)(w.prompts, w.params, w.priorities, {})), st.just({})), body
