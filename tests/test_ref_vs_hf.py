"""The oracle is itself checked: ref logits and greedy generations equal HF transformers'."""

from __future__ import annotations

import tempfile

import pytest
import torch
from hypothesis import given, strategies as st

from conformance.compare import LOGIT_ATOL, assert_close, check_tokens_equal
from ref.model import load_model
from ref.models import hf_config, write_checkpoint
from tests.hf_configs import FAMILIES, tiny_configs


def _hf_and_ref(family, overrides, seed, dtype="float32"):
    from transformers import AutoModelForCausalLM

    tmp = tempfile.TemporaryDirectory()
    write_checkpoint(tmp.name, hf_config(family, **overrides), seed=seed, tokenizer=False)
    hf = AutoModelForCausalLM.from_pretrained(tmp.name, dtype=getattr(torch, dtype)).eval()
    ref = load_model(tmp.name, dtype)
    return tmp, hf, ref


@given(cfg=tiny_configs(), seed=st.integers(0, 2**16), data=st.data())
def test_logits_match_hf_teacher_forced(cfg, seed, data):
    family, overrides = cfg
    tmp, hf, ref = _hf_and_ref(family, overrides, seed)
    with tmp:
        prompt = data.draw(st.lists(st.integers(0, overrides["vocab_size"] - 1), min_size=1, max_size=40))
        with torch.no_grad():
            expected = hf(torch.tensor([prompt])).logits[0].float()
        actual = ref.teacher_forced_logits(prompt)
        assert_close(f"{family} logits", actual, expected, atol=LOGIT_ATOL[torch.float32])


@given(cfg=tiny_configs(), seed=st.integers(0, 2**16), data=st.data())
def test_greedy_generation_matches_hf_generate(cfg, seed, data):
    from ref import LLM, SamplingParams

    family, overrides = cfg
    tmp, hf, _ = _hf_and_ref(family, overrides, seed)
    with tmp:
        vocab = overrides["vocab_size"]
        prompt = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=24))
        new = data.draw(st.integers(1, 12))
        with torch.no_grad():
            # An explicit mask: HF would otherwise treat prompt tokens equal to pad_token_id as padding.
            ids = torch.tensor([prompt])
            hf_out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        expected = hf_out[0, len(prompt):].tolist()
        llm = LLM(tmp.name)
        got = llm.generate({"prompt_token_ids": prompt},
                           SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
        actual = got[0].outputs[0].token_ids
        model = llm.llm_engine.model

        def gap_at(j):
            top2 = torch.topk(model.teacher_forced_logits(prompt + expected[:j])[-1], 2).values
            return float(top2[0] - top2[1])

        check_tokens_equal(f"{family} greedy", expected, actual, gap_at, torch.float32)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_logits_close_to_hf(family, dtype):
    overrides = dict(vocab_size=128, num_hidden_layers=2)
    tmp, hf, ref = _hf_and_ref(family, overrides, seed=3, dtype=dtype)
    with tmp:
        prompt = list(range(1, 30))
        with torch.no_grad():
            expected = hf(torch.tensor([prompt])).logits[0].float()
        actual = ref.teacher_forced_logits(prompt)
        assert ref.dtype == getattr(torch, dtype)
        assert_close(f"{family} {dtype} logits", actual, expected, atol=LOGIT_ATOL[getattr(torch, dtype)])
