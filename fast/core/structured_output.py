"""Structured output in the engine process: compiled grammars, one matcher per sample, and the
step's packed token bitmask.

    add_request:           compile(constraint)        (cached by the constraint's key; a bad one
                                                       is a ValueError before any state changes)
                           new_matcher(...)           one per sample, at the grammar's start
    after schedule():      grammar_bitmask(samples)   int32 [rows, ceil(vocab / 32)], bit t of a
                                                       row set = token t allowed; shipped to the
                                                       workers in SchedulerOutput
    update_from_output():  Request.append_token -> matcher.accept_token(token)

A matcher's state is exactly its sample's output tokens: preemption, recompute and prefix hits
replay the prompt's KV but sample no token, so they leave it alone; a forked sample has its own
matcher from the start. Which constraint means which grammar, and each token's bytes, come from
`ref.structured` (shared with the oracle, and proved by the conformance tier's independent
validators); what is `fast`'s own is the cache, the batched fill and the state tracking.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

import torch

from ref.sampling_params import StructuredOutputsParams
from ref.structured import compile_constraint, grammar_vocabulary

MAX_CACHED_GRAMMARS = 256  # compiled grammars kept (LRU): a server sees unboundedly many schemas


class StructuredOutputManager:
    """Compiles constraints for one engine and fills the bitmask of a step.

    The tokenizer info and compiler are built on the first constrained request (importing
    xgrammar takes ~2 s; unconstrained engines never pay it)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self._compiler = None
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()  # guards the cache and the lazy compiler, not a compile
        self.num_compiles = 0
        self.compile_time_s = 0.0
        self.fill_time_s = 0.0  # time spent filling bitmasks (the per-step cost of constraints)
        self.num_filled_rows = 0

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar

                info = grammar_vocabulary(self.tokenizer, self.vocab_size, self.eos_token_ids)
                # Our LRU is the only cache: xgrammar's own would grow with every distinct schema.
                self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
            return self._compiler

    def compile(self, so: StructuredOutputsParams):
        """The compiled grammar of a constraint (ValueError naming the field if it cannot be).

        Thread-safe: a server compiles in a side thread (xgrammar releases the GIL) while the
        engine thread steps and reads the cache."""
        key = so.key()
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        t0 = time.perf_counter()
        compiled = compile_constraint(self._get_compiler(), so)
        with self._lock:
            self.compile_time_s += time.perf_counter() - t0
            self.num_compiles += 1
            self._cache[key] = compiled
            if len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return compiled

    @staticmethod
    def new_matcher(compiled):
        import xgrammar

        return xgrammar.GrammarMatcher(compiled)

    def grammar_bitmask(self, matchers: list) -> torch.Tensor:
        """Row i: the tokens `matchers[i]` accepts next; all zeros once it has ended (xgrammar
        refuses to fill a terminated matcher, and SPEC says it then allows nothing)."""
        t0 = time.perf_counter()
        words = (self.vocab_size + 31) // 32
        bitmask = torch.zeros(len(matchers), words, dtype=torch.int32)
        for i, matcher in enumerate(matchers):
            if not matcher.is_terminated():
                matcher.fill_next_token_bitmask(bitmask, i)
        self.fill_time_s += time.perf_counter() - t0
        self.num_filled_rows += len(matchers)
        return bitmask

