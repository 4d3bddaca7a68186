"""Which grammar library structured output runs on: xgrammar vs llguidance, measured here.

    python -m benchmarks.grammar_engines [--rounds 3] [--batch 64] [--max-walk 64] [--out benchmarks/results]

Issue #16 asks to pick the library "by measurement on this machine (compile time of a schema,
per-step mask cost at batch 64)". Both libraries are driven the way an engine drives them, on
the same tokenizers, constraints and token sequences, taking turns in one process (rounds
interleaved, the order rotated), timed in CPU time (`time.process_time`, every thread of the
process) with torch and both libraries on one thread: the machine is shared, and CPU time of one
thread is what stays repeatable under load. Every figure is the best of `--rounds`.

Vocabularies:
  embedded-512   the embedded model's tokenizer (`ref.models.tiny_checkpoint()`: a byte-level BPE
                 trained on ref/models.py's small corpus, 512 ids)
  synthetic-32k  a 32,000-id byte-level BPE trained here, in seconds, with `tokenizers` on a
                 seeded synthetic corpus (ref/models.py's corpus, pseudo-English words from
                 syllables with Zipf frequencies, numbers, JSON lines): the size of a real model's
                 vocabulary (32k-150k), not its content (no multilingual or long code tokens)
Constraints (`benchmarks.workloads`): json-schema (5 properties: string, integer range, enum,
array of strings, number), json-object (any JSON object), regex (an e-mail address with `+`
repetitions), regex-bounded (the same address with {2,15} / {3,10} repetitions), choice (one of
4 words). Whitespace: both libraries' defaults, which agree (any JSON whitespace).

Sequences (`--batch` of them per constraint, each ending with EOS where it ends):
  text   valid outputs (random instances of the schema / objects / addresses / choices)
         tokenized by the tokenizer: what a trained model writes
  walk   random walks over the tokens BOTH libraries allow (their masks ANDed), uniform, up to
         `--max-walk` tokens: what a random-init model writes (long strings, odd splits)
Every text sequence must be accepted token by token by both libraries (a rejection raises,
naming the library, constraint, sequence and index); the walks record how often the two masks
were identical, and in how many states each allowed a token the other did not. Where they
differed when this was written, it was always xgrammar allowing more: the DEL byte (0x7F) raw
inside a JSON string (JSON allows it, llguidance's lexer does not), and, where the rest of the
text is forced (the tail of a choice, of a key or of `.com`), tokenizations other than the
canonical one (llguidance allows only the canonical token of forced text).

Measured, per vocabulary and constraint:
  tokenizer info   xgrammar: `ref.structured.grammar_vocabulary` (what the engines build);
                   llguidance: `llguidance.hf.from_tokenizer`
  compile          xgrammar: `ref.structured.compile_constraint` on a compiler with its cache
                   cleared (cold) and again (a cache hit); llguidance has no compile step apart
                   from building a matcher (grammar text + `LLMatcher`), repeated per request
  new matcher      per request: xgrammar `GrammarMatcher(compiled)`, llguidance `LLMatcher(...)`
  first mask       cold compile + matcher + the first mask: a new schema's cost before its first
                   token (llguidance builds its lexer lazily, so its compile cost moves here)
  fill             the next-token bitmask of every live row, step by step along the sequences
                   (fresh matchers each round): ms per step at `--batch` rows (total fill time /
                   rows filled x batch) and the p99 of a step's per-row cost; both the per-row
                   loop (what fast's scheduler does) and the library's batch call (xgrammar
                   BatchGrammarMatcher, llguidance LLExecutor; both on one thread)
  accept           µs per row to advance a matcher by its token
  apply            ms to apply a [batch, vocab] bitmask to fp32 logits: xgrammar's CPU kernel,
                   llguidance's torch.compile kernel (its compile time is reported apart), and two
                   plain-torch unpackings (shift per bit, as fast/core/structured_output.py; and a
                   byte lookup table). The bitmask layout is the same in both libraries, so any
                   engine may use any of these.

Writes grammar_engines.json and grammar_engines.md under --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch

from benchmarks.workloads import STRUCTURED_CHOICE, STRUCTURED_REGEX, STRUCTURED_REGEX_BOUNDED, STRUCTURED_SCHEMA
from ref.sampling_params import StructuredOutputsParams

EOS = 2  # ref.models.SPECIAL_TOKENS: <pad> 0, <s> 1, </s> 2
cpu = time.process_time


# ----------------------------------------------------------------------------- vocabularies

@dataclass
class Vocabulary:
    name: str
    what: str
    tokenizer: object  # a transformers PreTrainedTokenizerFast
    vocab_size: int


def embedded_vocabulary() -> Vocabulary:
    from ref.models import tiny_checkpoint
    from ref.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_checkpoint())
    return Vocabulary("embedded-512", "ref.models.tiny_checkpoint() tokenizer (byte-level BPE, 512 ids)", tok, 512)


_ONSETS = ("b c d f g h j k l m n p r s t v w y z bl br ch cl cr dr fl fr gl gr pl pr sc sh sk sl sm sn sp st str sw "
           "th tr wh").split()
_VOWELS = "a e i o u y ai ea ee ie oa oo ou".split()
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "rs", "st", "ck", "sh", "th", "ed", "er", "ing",
          "ly", "tion"]


def synthetic_corpus(lines: int = 30_000, seed: int = 0) -> list[str]:
    """~3.6 MB of seeded text: sentences of pseudo-words (Zipf), JSON lines, numbers, and the
    embedded corpus, so that a 32k BPE has enough distinct merges (the embedded corpus alone
    stops near 700)."""
    from ref.models import CORPUS

    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(rng.choice([1, 1, 2, 2, 2, 3, 3, 4])))

    lexicon = sorted({word() for _ in range(120_000)})
    rng.shuffle(lexicon)
    cum = list(itertools.accumulate(1 / (i + 10) for i in range(len(lexicon))))
    words = lambda k: rng.choices(lexicon, cum_weights=cum, k=k)  # noqa: E731

    def sentence() -> str:
        ws = words(rng.randint(4, 18))
        if rng.random() < 0.3:
            ws[0] = ws[0].capitalize()
        return " ".join(ws) + rng.choice(".,!?;:")

    def json_line() -> str:
        def value():
            return rng.choice([words(1)[0], rng.randint(-1000, 100_000), round(rng.uniform(-100, 100), 3), True, None,
                               words(rng.randint(0, 3))])

        obj = {words(1)[0]: value() for _ in range(rng.randint(1, 5))}
        return json.dumps(obj, separators=rng.choice([(",", ":"), (", ", ": ")]))

    out = []
    for _ in range(lines):
        r = rng.random()
        line = sentence() if r < 0.7 else json_line() if r < 0.95 else str(rng.randint(0, 10 ** rng.randint(1, 9)))
        out.append(line + "\n")
    return out + CORPUS.splitlines(keepends=True) * 20


def synthetic_vocabulary(vocab_size: int = 32_000) -> Vocabulary:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ref.models import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(synthetic_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"the synthetic BPE has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return Vocabulary(f"synthetic-{vocab_size // 1000}k",
                      f"byte-level BPE of {vocab_size} ids trained here on a seeded synthetic corpus", hf, vocab_size)


# ----------------------------------------------------------------------------- constraints

_WORDS = ("quick brown fox jumps over the lazy dog paged cache blocks village fisherman harbor gulls "
          "scheduler token émigré café naïve façade apples oranges Monday Tuesday rivers ocean").split()


def _phrase(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 3)))


def _dumps(rng: random.Random, value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=rng.choice([(",", ":"), (", ", ": ")]))


def _schema_instance(rng: random.Random) -> str:
    return _dumps(rng, {"name": _phrase(rng), "age": rng.randint(0, 150),
                        "status": rng.choice(["active", "inactive", "pending"]),
                        "tags": [rng.choice(_WORDS) for _ in range(rng.randint(0, 4))],
                        "score": round(rng.uniform(-100, 100), rng.randint(0, 3))})


def _json_value(rng: random.Random, depth: int):
    kinds = ["str", "int", "float", "bool", "null"] + (["obj", "list"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "obj":
        return {rng.choice(_WORDS): _json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    if kind == "list":
        return [_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {"str": lambda: _phrase(rng), "int": lambda: rng.randint(-999, 99_999),
            "float": lambda: round(rng.uniform(-10, 10), 2), "bool": lambda: rng.random() < 0.5,
            "null": lambda: None}[kind]()


def _json_object(rng: random.Random) -> str:
    return _dumps(rng, {rng.choice(_WORDS): _json_value(rng, 1) for _ in range(rng.randint(1, 4))})


def _email(rng: random.Random) -> str:
    letters, rest = "abcdefghijklmnopqrstuvwxyz", "abcdefghijklmnopqrstuvwxyz0123456789._"
    user = rng.choice(letters) + "".join(rng.choice(rest) for _ in range(rng.randint(2, 15)))
    host = "".join(rng.choice(letters) for _ in range(rng.randint(3, 10)))
    return f"{user}@{host}.{rng.choice(['com', 'org', 'net'])}"


@dataclass(frozen=True)
class Constraint:
    name: str
    params: StructuredOutputsParams  # what xgrammar compiles (through ref.structured, as the engines)
    llguidance_grammar: Callable[[], str]  # the same language for llguidance
    example: Callable[[random.Random], str]  # a random valid output


def constraints() -> list[Constraint]:
    import llguidance

    m = llguidance.LLMatcher
    return [
        Constraint("json-schema", StructuredOutputsParams(json=STRUCTURED_SCHEMA),
                   lambda: m.grammar_from_json_schema(STRUCTURED_SCHEMA), _schema_instance),
        Constraint("json-object", StructuredOutputsParams(json_object=True),
                   lambda: m.grammar_from_json_schema({"type": "object"}), _json_object),
        Constraint("regex", StructuredOutputsParams(regex=STRUCTURED_REGEX),
                   lambda: m.grammar_from_regex(STRUCTURED_REGEX), _email),
        Constraint("regex-bounded", StructuredOutputsParams(regex=STRUCTURED_REGEX_BOUNDED),
                   lambda: m.grammar_from_regex(STRUCTURED_REGEX_BOUNDED), _email),
        Constraint("choice", StructuredOutputsParams(choice=STRUCTURED_CHOICE),
                   lambda: llguidance.grammar_from("choice", json.dumps(STRUCTURED_CHOICE)),
                   lambda rng: rng.choice(STRUCTURED_CHOICE)),
    ]


# ----------------------------------------------------------------------------- the two libraries

class XGrammar:
    """xgrammar as the engines use it: `ref.structured` builds the vocabulary and the grammar."""

    name = "xgrammar"
    fills = ("loop", "batch")

    def __init__(self, vocab: Vocabulary):
        import xgrammar

        from ref.structured import grammar_vocabulary

        self.xgr = xgrammar
        t0 = cpu()
        info = grammar_vocabulary(vocab.tokenizer, vocab.vocab_size, (EOS,))
        self.info_s = cpu() - t0
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=1)

    def compile(self, c: Constraint, cold: bool = True):
        from ref.structured import compile_constraint

        if cold:
            self.compiler.clear_cache()
        return compile_constraint(self.compiler, c.params)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, how: str, matchers: list, bitmask: torch.Tensor) -> None:
        if how == "batch":
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)
        else:
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(bitmask, i)

    @staticmethod
    def accept(matcher, token: int) -> bool:
        return matcher.accept_token(token)


class LLGuidance:
    """llguidance as vLLM's `guidance` backend uses it: one LLMatcher per request."""

    name = "llguidance"
    fills = ("loop", "par")

    def __init__(self, vocab: Vocabulary):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg, self.llg_torch = llguidance, llguidance.torch
        t0 = cpu()
        self.tokenizer = llguidance.hf.from_tokenizer(vocab.tokenizer, n_vocab=vocab.vocab_size, eos_token=EOS)
        self.info_s = cpu() - t0
        self.executor = llguidance.LLExecutor(num_threads=1)

    def compile(self, c: Constraint, cold: bool = True):
        grammar = c.llguidance_grammar()
        self.matcher(grammar)  # building a matcher is where llguidance checks and compiles a grammar
        return grammar

    def matcher(self, grammar: str):
        m = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise ValueError(f"llguidance cannot build a matcher: {m.get_error()}")
        return m

    def fill(self, how: str, matchers: list, bitmask: torch.Tensor) -> None:
        if how == "par":
            self.llg_torch.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)],
                                                       bitmask[:len(matchers)])
        else:
            for i, m in enumerate(matchers):
                self.llg_torch.fill_next_token_bitmask(m, bitmask, i)

    @staticmethod
    def accept(matcher, token: int) -> bool:
        return matcher.consume_token(token)


# ----------------------------------------------------------------------------- sequences

def unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [rows, vocab]: bit t % 32 of word t // 32 (both libraries' layout)."""
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def text_sequences(libs, compiled: dict, c: Constraint, vocab: Vocabulary, n: int, seed: int) -> list[list[int]]:
    """`n` valid outputs tokenized, + EOS; each checked token by token by both libraries."""
    rng = random.Random(seed)
    seqs = [vocab.tokenizer.encode(c.example(rng), add_special_tokens=False) + [EOS] for _ in range(n)]
    for lib in libs:
        for s, seq in enumerate(seqs):
            m = lib.matcher(compiled[lib.name])
            for j, t in enumerate(seq):
                if not lib.accept(m, t):
                    raise AssertionError(f"{lib.name} rejects token {j} ({t}, {vocab.tokenizer.decode([t])!r}) of "
                                         f"{c.name} text {s} {vocab.tokenizer.decode(seq)!r} ({vocab.name})")
    return seqs


def walk_sequences(libs, compiled: dict, vocab: Vocabulary, n: int, max_len: int, seed: int
                   ) -> tuple[list[list[int]], dict]:
    """`n` random walks over the tokens both libraries allow, all rows in lockstep; stops a row
    at EOS, at max_len, or where the two masks share no token. Also how often the masks agreed,
    and in how many states each library allowed a token the other did not (libs[0] is xgrammar)."""
    gen = torch.Generator().manual_seed(seed)
    words = (vocab.vocab_size + 31) // 32
    matchers = {lib.name: [lib.matcher(compiled[lib.name]) for _ in range(n)] for lib in libs}
    seqs: list[list[int]] = [[] for _ in range(n)]
    live = list(range(n))
    states = equal = dead_ends = xgr_only = llg_only = 0
    while live:
        masks = []
        for lib in libs:
            bm = torch.zeros(len(live), words, dtype=torch.int32)
            lib.fill("loop", [matchers[lib.name][r] for r in live], bm)
            masks.append(bm)
        states += len(live)
        equal += int((masks[0] == masks[1]).all(dim=1).sum())
        xgr_only += int((masks[0] & ~masks[1]).any(dim=1).sum())
        llg_only += int((masks[1] & ~masks[0]).any(dim=1).sum())
        allowed = unpack(masks[0] & masks[1], vocab.vocab_size)
        nxt = []
        for k, r in enumerate(live):
            if not allowed[k].any():
                dead_ends += 1
                continue
            t = int(torch.multinomial(allowed[k].float(), 1, generator=gen))
            seqs[r].append(t)
            for lib in libs:
                if not lib.accept(matchers[lib.name][r], t):
                    raise AssertionError(f"{lib.name} rejects token {t} its own mask allowed (walk {r})")
            if t != EOS and len(seqs[r]) < max_len:
                nxt.append(r)
        live = nxt
    return seqs, {"mask_states": states, "masks_identical": equal / states if states else None,
                  "states_xgrammar_allows_more": xgr_only, "states_llguidance_allows_more": llg_only,
                  "dead_ends": dead_ends}


# ----------------------------------------------------------------------------- timing

@dataclass
class FillRun:
    fill_s: float = 0.0
    rows: int = 0
    accept_s: float = 0.0
    per_row_step_s: list[float] = field(default_factory=list)  # each step's fill time / its rows
    snapshot: torch.Tensor | None = None  # the bitmask of the step with the most rows, middle of the run


def replay(lib, how: str, compiled, seqs: list[list[int]], vocab_size: int) -> FillRun:
    """Fresh matchers; at every step fill the mask of every live row, then advance each."""
    matchers = [lib.matcher(compiled) for _ in seqs]
    bitmask = torch.zeros(len(seqs), (vocab_size + 31) // 32, dtype=torch.int32)
    run = FillRun()
    full_steps = sum(1 for s in range(max(map(len, seqs))) if all(len(q) > s for q in seqs))
    for step in range(max(map(len, seqs))):
        live = [r for r, q in enumerate(seqs) if len(q) > step]
        ms = [matchers[r] for r in live]
        t0 = cpu()
        lib.fill(how, ms, bitmask)
        dt = cpu() - t0
        run.fill_s += dt
        run.rows += len(live)
        run.per_row_step_s.append(dt / len(live))
        if step == full_steps // 2:
            run.snapshot = bitmask[:len(live)].clone()
        t0 = cpu()
        for r, m in zip(live, ms):
            if not lib.accept(m, seqs[r][step]):
                raise AssertionError(f"{lib.name} rejects token {step} of sequence {r}")
        run.accept_s += cpu() - t0
    return run


def time_compile(lib, c: Constraint, rounds: int, vocab_size: int) -> dict:
    cold, again, first, new = [], [], [], []
    bitmask = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)
    for _ in range(rounds):
        t0 = cpu()
        compiled = lib.compile(c, cold=True)
        cold.append(cpu() - t0)
        t0 = cpu()
        lib.compile(c, cold=False)
        again.append(cpu() - t0)
        t0 = cpu()
        for _ in range(16):
            lib.matcher(compiled)
        new.append((cpu() - t0) / 16)
        t0 = cpu()
        lib.fill("loop", [lib.matcher(lib.compile(c, cold=True))], bitmask)
        first.append(cpu() - t0)
    return {"compile_cold_s": min(cold), "compile_again_s": min(again), "new_matcher_s": min(new),
            "first_mask_s": min(first)}


def apply_variants() -> dict[str, Callable]:
    import llguidance.torch
    import xgrammar

    lut = ((torch.arange(256, dtype=torch.int32).unsqueeze(1) >> torch.arange(8, dtype=torch.int32)) & 1).bool()

    def shift(logits, bm):  # fast/core/structured_output.unpack_bitmask, then masked_fill_
        bits = (bm.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
        logits.masked_fill_(~bits.reshape(bm.shape[0], -1)[:, :logits.shape[1]].bool(), float("-inf"))

    def byte_lut(logits, bm):  # each byte of the (little-endian) int32 words indexes an 8-bool row
        allowed = lut[bm.view(torch.uint8).long()].reshape(bm.shape[0], -1)[:, :logits.shape[1]]
        logits.masked_fill_(~allowed, float("-inf"))

    return {
        "xgrammar-cpu": lambda lg, bm: xgrammar.apply_token_bitmask_inplace(lg, bm),
        "llguidance-compiled": llguidance.torch.apply_token_bitmask_inplace,
        "torch-shift": shift,
        "torch-byte-lut": byte_lut,
    }


def time_apply(bitmask: torch.Tensor, vocab_size: int, rounds: int, reps: int = 20) -> dict:
    variants = apply_variants()
    logits = torch.randn(bitmask.shape[0], vocab_size, generator=torch.Generator().manual_seed(0))
    want = logits.clone()
    want[~unpack(bitmask, vocab_size)] = float("-inf")
    first = {}
    for name, fn in variants.items():  # warm-up (llguidance's kernel compiles here) and a check
        got = logits.clone()
        t0 = time.perf_counter()
        fn(got, bitmask)
        first[name] = time.perf_counter() - t0
        if not torch.equal(got, want):
            raise AssertionError(f"apply {name} masks differently from the unpacked bitmask at [{bitmask.shape[0]}, "
                                 f"{vocab_size}]")
    times = {name: [] for name in variants}
    for r in range(rounds):
        for name, fn in variants.items():
            lg = logits.clone()
            t0 = cpu()
            for _ in range(reps):
                fn(lg, bitmask)
            times[name].append((cpu() - t0) / reps)
    return {"apply_s": {n: min(t) for n, t in times.items()},
            "apply_first_call_wall_s": first}


# ----------------------------------------------------------------------------- the run

def measure_vocabulary(vocab: Vocabulary, args) -> dict:
    libs = [XGrammar(vocab), LLGuidance(vocab)]
    out = {"vocabulary": vocab.name, "what": vocab.what, "vocab_size": vocab.vocab_size,
           "tokenizer_info_s": {lib.name: lib.info_s for lib in libs}, "constraints": {}}
    snapshot = None
    for c in constraints():
        compiled = {lib.name: lib.compile(c) for lib in libs}
        row: dict = {"compile": {lib.name: time_compile(lib, c, args.rounds, vocab.vocab_size) for lib in libs},
                     "fill": {}}
        seqs = {"text": text_sequences(libs, compiled, c, vocab, args.batch, seed=1)}
        seqs["walk"], row["walk_masks"] = walk_sequences(libs, compiled, vocab, args.batch, args.max_walk, seed=2)
        for kind, ss in seqs.items():
            runs: dict[str, list[FillRun]] = {f"{lib.name}/{how}": [] for lib in libs for how in lib.fills}
            for r in range(args.rounds):
                order = [(lib, how) for lib in libs for how in lib.fills]
                for lib, how in order[r % len(order):] + order[:r % len(order)]:
                    runs[f"{lib.name}/{how}"].append(replay(lib, how, compiled[lib.name], ss, vocab.vocab_size))
            cell = {"tokens_per_sequence": statistics.mean(map(len, ss))}
            for key, rs in runs.items():
                run = min(rs, key=lambda x: x.fill_s)
                steps = sorted(run.per_row_step_s)
                cell[key] = {"fill_ms_per_step": 1e3 * run.fill_s / run.rows * args.batch,
                             "fill_us_per_row_p99": 1e6 * steps[min(len(steps) - 1, int(0.99 * len(steps)))],
                             "accept_us_per_row": 1e6 * min(x.accept_s for x in rs) / run.rows}
                if c.name == "json-schema" and kind == "text" and key == "xgrammar/loop":
                    snapshot = run.snapshot
            row["fill"][kind] = cell
        out["constraints"][c.name] = row
        print(f"  {vocab.name} {c.name}: done", flush=True)
    out["apply"] = time_apply(snapshot, vocab.vocab_size, args.rounds)
    out["apply"]["rows"] = int(snapshot.shape[0])
    return out


def markdown(doc: dict) -> str:
    ms = lambda s: f"{1e3 * s:.2f}"  # noqa: E731
    us = lambda s: f"{1e6 * s:.0f}"  # noqa: E731
    b = doc["batch"]
    lines = [f"Grammar libraries: xgrammar {doc['xgrammar']} vs llguidance {doc['llguidance']}; {doc['machine']}; "
             f"torch {doc['torch']}, 1 thread, CPU time (process_time), the libraries taking turns in one process, "
             f"best of {doc['rounds']} rounds. Batch {b}.", ""]
    for v in doc["vocabularies"]:
        info = v["tokenizer_info_s"]
        lines += [f"**{v['vocabulary']}**: {v['what']}. Tokenizer info: xgrammar {ms(info['xgrammar'])} ms, "
                  f"llguidance {ms(info['llguidance'])} ms.", "",
                  "| constraint | xgr compile cold ms | xgr cache hit µs | xgr new matcher µs | xgr first mask ms "
                  "| llg matcher (= compile) ms | llg first mask ms |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, row in v["constraints"].items():
            x, g = row["compile"]["xgrammar"], row["compile"]["llguidance"]
            lines.append(f"| {name} | {ms(x['compile_cold_s'])} | {us(x['compile_again_s'])} "
                         f"| {us(x['new_matcher_s'])} | {ms(x['first_mask_s'])} | {ms(g['compile_cold_s'])} "
                         f"| {ms(g['first_mask_s'])} |")
        lines += ["", f"Mask fill, ms per step at {b} rows (p99 of a step's per-row cost, µs); accept µs/row:", "",
                  "| constraint | seqs | tok/seq | xgr loop | xgr batch | llg loop | llg par | llg ÷ xgr (loop) "
                  "| accept xgr / llg | masks identical |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, row in v["constraints"].items():
            for kind, cell in row["fill"].items():
                f = lambda k: f"{cell[k]['fill_ms_per_step']:.2f} ({cell[k]['fill_us_per_row_p99']:.0f})"  # noqa: E731
                ratio = cell["llguidance/loop"]["fill_ms_per_step"] / cell["xgrammar/loop"]["fill_ms_per_step"]
                same = row["walk_masks"]["masks_identical"] if kind == "walk" else None
                lines.append(f"| {name} | {kind} | {cell['tokens_per_sequence']:.1f} | {f('xgrammar/loop')} "
                             f"| {f('xgrammar/batch')} | {f('llguidance/loop')} | {f('llguidance/par')} | {ratio:.2f} "
                             f"| {cell['xgrammar/loop']['accept_us_per_row']:.1f} / "
                             f"{cell['llguidance/loop']['accept_us_per_row']:.1f} "
                             f"| {'–' if same is None else f'{100 * same:.0f}%'} |")
        more = [sum(r["walk_masks"][f"states_{k}_allows_more"] for r in v["constraints"].values())
                for k in ("xgrammar", "llguidance")]
        lines += ["", f"masks identical: share of the walks' states in which both libraries allowed exactly the same "
                  f"tokens; in the others xgrammar allowed a token llguidance did not in {more[0]} states, "
                  f"llguidance one xgrammar did not in {more[1]} (all constraints together)."]
        a = v["apply"]
        lines += ["", f"Apply a [{a['rows']}, {v['vocab_size']}] bitmask to fp32 logits, ms: "
                  + ", ".join(f"{n} {ms(s)}" for n, s in a["apply_s"].items()) + "."
                  + (f" The first call of llguidance's kernel in this process compiled it (torch.compile): "
                     f"{first:.1f} s wall." if (first := a["apply_first_call_wall_s"]["llguidance-compiled"]) >= 0.5
                     else ""), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-walk", type=int, default=64)
    ap.add_argument("--synthetic-vocab", type=int, default=32_000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    doc = {"xgrammar": version("xgrammar"), "llguidance": version("llguidance"), "torch": torch.__version__,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "batch": args.batch, "rounds": args.rounds,
           "max_walk": args.max_walk, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "vocabularies": []}
    for make in (embedded_vocabulary, lambda: synthetic_vocabulary(args.synthetic_vocab)):
        vocab = make()
        print(f"{vocab.name}: {vocab.what}", flush=True)
        doc["vocabularies"].append(measure_vocabulary(vocab, args))
    doc["wall_s"] = time.perf_counter() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grammar_engines.json").write_text(json.dumps(doc, indent=2))
    md = markdown(doc)
    (args.out / "grammar_engines.md").write_text(md + "\n")
    print(md)
    print(f"wrote {args.out / 'grammar_engines.json'} and grammar_engines.md ({doc['wall_s']:.0f} s wall)")


if __name__ == "__main__":
    main()
