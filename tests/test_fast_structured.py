"""fast's own structured-output machinery: the packed bitmask, its rows, the compile cache, rule 0.

Equality with the oracle under pressure (preemption, chunking, prefix hits, n > 1) is the
conformance `structured` tier's job (tests/test_conformance_structured.py); these tests pin
what is fast's alone and fail loudly and locally when it breaks.
"""

from __future__ import annotations

import re

import pytest
import regex
import torch
from hypothesis import given, strategies as st

import fast
from fast.core.structured_output import MAX_CACHED_GRAMMARS
from fast.worker.sampler import NO_TOKEN, GrammarRows, Sampler, SamplingRow, unpack_bitmask
from ref.models import tiny_checkpoint
from ref.sampling_params import SamplingParams, StructuredOutputsParams as SO


@pytest.fixture(scope="module")
def llm():
    return fast.LLM(tiny_checkpoint("llama"), max_num_seqs=8)


def _pack(allowed: torch.Tensor) -> torch.Tensor:
    """xgrammar's layout written out plainly: token t is bit t % 32 of int32 word t // 32."""
    rows, vocab = allowed.shape
    words = torch.zeros(rows, (vocab + 31) // 32, dtype=torch.int64)
    for r in range(rows):
        for t in range(vocab):
            if allowed[r, t]:
                words[r, t // 32] |= 1 << (t % 32)
    words[words >= 2**31] -= 2**32  # as int32 two's complement
    return words.to(torch.int32)


@given(st.integers(1, 4), st.integers(1, 100), st.integers(0, 2**31 - 1))
def test_unpack_bitmask_is_the_packed_layout(rows, vocab, seed):
    allowed = torch.rand(rows, vocab, generator=torch.Generator().manual_seed(seed)) < 0.5
    assert torch.equal(unpack_bitmask(_pack(allowed), vocab), allowed)


def test_unpack_matches_xgrammar_fill(llm):
    """Our unpacking reads what xgrammar wrote: a choice of single characters allows those tokens."""
    manager = llm.llm_engine.structured
    matcher = manager.new_matcher(manager.compile(SO(choice=["a", "b"])))
    allowed = unpack_bitmask(manager.grammar_bitmask([matcher]), manager.vocab_size)[0]
    tok = llm.get_tokenizer()
    want = {tok.convert_tokens_to_ids(c) for c in ("a", "b")}
    assert set(torch.nonzero(allowed).flatten().tolist()) == want


def test_sampler_applies_each_rows_own_bitmask_row():
    """Rows are constrained by their own bitmask row (not their neighbour's), unconstrained rows by none."""
    V = 40
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, V, dtype=torch.bool)
    masks[0, 7] = True   # bitmask row 0: only token 7
    masks[1, 11] = True  # bitmask row 1: only token 11
    rows = [SamplingRow(SamplingParams(temperature=0.0), [1], [], None) for _ in range(3)]
    out = Sampler((2,))(logits, rows, GrammarRows(_pack(masks), [1, -1, 0]))
    assert out.token_ids[0] == 11 and out.token_ids[2] == 7
    assert out.token_ids[1] == int(torch.argmax(logits[1]))


def test_sampler_rule0_row_samples_nothing_and_draws_nothing():
    V = 16
    logits = torch.randn(2, V)
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    rows = [SamplingRow(SamplingParams(temperature=1.0, seed=5, allowed_token_ids=[3], bad_words=["x"]), [1], [], gen,
                        bad_words_token_ids=[[3]]),
            SamplingRow(SamplingParams(temperature=0.0, logprobs=2), [1], [], None)]
    out = Sampler((2,))(logits, rows)
    assert out.token_ids[0] == NO_TOKEN and out.logprobs[0] is None
    assert torch.equal(gen.get_state(), state)  # a row that ends draws no noise
    assert out.token_ids[1] == int(torch.argmax(logits[1]))


def test_each_row_gets_its_own_language_in_one_batch(llm):
    """Disjoint languages side by side: a misaligned bitmask row shows as a foreign character."""
    cases = [("[ab]{2,5}", SO(regex="[ab]{2,5}")), ("[xy]{2,5}", SO(regex="[xy]{2,5}")),
             ("(cat|dog)", SO(choice=["cat", "dog"])), ("[0-9]{1,3}", SO(regex="[0-9]{1,3}"))]
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=12, structured_outputs=so, n=2)
              for i, (_, so) in enumerate(cases)]
    outs = llm.generate(["The quick brown fox"] * len(cases), params, use_tqdm=False)
    finished = 0
    for (pattern, _), out in zip(cases, outs):
        for c in out.outputs:
            assert c.finish_reason in ("stop", "length"), c  # "abort": the grammar refused a sampled token
            if c.finish_reason == "stop":
                finished += 1
                assert re.fullmatch(pattern, c.text), (pattern, c.text)
            else:  # cut by max_tokens: still a prefix of a sentence
                assert regex.fullmatch(pattern, c.text, partial=True), (pattern, c.text)
    assert finished >= 4


def test_grammar_follows_tokens_through_preemption_and_chunking():
    """A tiny pool and a tiny token budget: samples are preempted, recomputed in chunks, and still
    end in their language (a grammar advanced twice, or not at all, would break the regex)."""
    llm = fast.LLM(tiny_checkpoint("llama"), num_kv_blocks=12, block_size=4, max_model_len=40,
                   max_num_batched_tokens=8, max_num_seqs=4, enable_prefix_caching=True)
    prompt = "Once upon a time, in a small village by the sea, there lived"
    params = [SamplingParams(temperature=0.9, seed=s, max_tokens=10, structured_outputs=SO(regex="(ab|cd)+e"))
              for s in range(6)]
    outs = llm.generate([prompt] * 6, params, use_tqdm=False)
    assert llm.llm_engine.get_metrics().num_preemptions > 0
    for out in outs:
        c = out.outputs[0]
        assert c.finish_reason in ("stop", "length"), c
        if c.finish_reason == "stop":
            assert re.fullmatch("(ab|cd)+e", c.text), c.text
        else:
            assert regex.fullmatch("(ab|cd)+e", c.text, partial=True), c.text


def test_min_tokens_past_the_grammars_end_ends_by_rule0(llm):
    out = llm.generate("Hi", SamplingParams(temperature=0.0, max_tokens=20, min_tokens=10,
                                            structured_outputs=SO(choice=["ok"])), use_tqdm=False)[0].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == ("ok", "stop", None)
    assert 2 not in out.token_ids  # EOS was held back by min_tokens; nothing else was allowed


def test_ignore_eos_after_the_grammars_end_ends_by_rule0(llm):
    out = llm.generate("Hi", SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                            structured_outputs=SO(choice=["ok"])), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == 2 and out.text.startswith("ok")


def test_bad_constraint_rejected_before_anything_is_queued(llm):
    engine = llm.llm_engine
    with pytest.raises(ValueError, match=r"structured_outputs\.regex cannot be compiled"):
        llm.generate(["a", "b"], [SamplingParams(structured_outputs=SO(regex="a")),
                                  SamplingParams(structured_outputs=SO(regex="(("))], use_tqdm=False)
    assert not engine.has_unfinished_requests()


def test_compile_cache_is_keyed_by_constraint_and_bounded(llm):
    manager = llm.llm_engine.structured
    before = manager.num_compiles
    a = manager.compile(SO(json={"type": "object", "properties": {"k": {"type": "boolean"}}}))
    b = manager.compile(SO(json='{"properties": {"k": {"type": "boolean"}}, "type": "object"}'))
    assert a is b and manager.num_compiles == before + 1  # same schema, other key order: one compile
    for i in range(MAX_CACHED_GRAMMARS + 5):
        manager.compile(SO(choice=[f"c{i}"]))
    assert len(manager._cache) == MAX_CACHED_GRAMMARS
