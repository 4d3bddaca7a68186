"""Every SamplingParams rule of the reference sampler, as properties over random logits."""

from __future__ import annotations

import torch
from hypothesis import given, strategies as st

from ref.sampler import apply_penalties, logprob_entry, process_logits, sample, truncate
from ref.sampling_params import SamplingParams

VOCAB = 64


@st.composite
def logits_rows(draw, vocab=VOCAB):
    seed = draw(st.integers(0, 2**31))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * scale


token_lists = st.lists(st.integers(0, VOCAB - 1), max_size=30)


@given(logits=logits_rows(), k=st.integers(1, VOCAB))
def test_top_k_keeps_exactly_the_k_largest(logits, k):
    kept = torch.isfinite(truncate(logits, SamplingParams(top_k=k)))
    assert int(kept.sum()) == k  # random floats: no ties
    assert kept[torch.topk(logits, k).indices].all()


@given(logits=logits_rows(), top_p=st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_prefix_reaching_p(logits, top_p):
    kept = torch.isfinite(truncate(logits, SamplingParams(top_p=top_p)))
    probs = torch.softmax(logits, -1)
    kept_probs = probs[kept]
    assert float(kept_probs.sum()) >= top_p - 1e-5 or bool(kept.all())
    assert float(kept_probs.sum() - kept_probs.min()) < top_p + 1e-5  # minimal
    assert float(probs[~kept].max()) <= float(kept_probs.min()) if (~kept).any() else True


@given(logits=logits_rows(), min_p=st.floats(0.0, 1.0))
def test_min_p_threshold(logits, min_p):
    kept = torch.isfinite(truncate(logits, SamplingParams(min_p=min_p)))
    probs = torch.softmax(logits, -1)
    threshold = min_p * probs.max()
    assert bool((probs[kept] >= threshold).all())
    assert bool((probs[~kept] < threshold).all())
    assert kept[probs.argmax()]


@given(logits=logits_rows(), prompt=token_lists, output=token_lists,
       rep=st.floats(0.5, 2.0), freq=st.floats(-2, 2), pres=st.floats(-2, 2))
def test_penalties(logits, prompt, output, rep, freq, pres):
    p = SamplingParams(repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres)
    got = apply_penalties(logits, p, prompt, output)
    for t in range(VOCAB):
        x = float(logits[t])
        if t in prompt or t in output:
            x = x / rep if x > 0 else x * rep
        count = output.count(t)
        x -= freq * count + pres * (count > 0)
        assert abs(float(got[t]) - x) < 1e-5, (t, float(got[t]), x)


@given(logits=logits_rows(), output=token_lists, min_tokens=st.integers(0, 40),
       stop_ids=st.lists(st.integers(0, VOCAB - 1), max_size=3), ignore_eos=st.booleans())
def test_min_tokens_masks_stop_tokens(logits, output, min_tokens, stop_ids, ignore_eos):
    p = SamplingParams(min_tokens=min_tokens, max_tokens=100, stop_token_ids=stop_ids, ignore_eos=ignore_eos)
    eos = (2,)
    got = process_logits(logits, p, [], output, eos)
    masked = set(stop_ids) | (set() if ignore_eos else set(eos))
    for t in range(VOCAB):
        is_inf = got[t] == float("-inf")
        assert is_inf == (len(output) < min_tokens and t in masked)


@given(logits=logits_rows(), prompt=token_lists, output=token_lists, rep=st.floats(0.5, 2.0))
def test_greedy_is_argmax_of_processed_logits(logits, prompt, output, rep):
    p = SamplingParams(temperature=0, repetition_penalty=rep)
    expected = int(process_logits(logits, p, prompt, output, (2,)).argmax())
    assert sample(logits, p, prompt, output, (2,), None) == expected


@given(logits=logits_rows(), seed=st.integers(0, 2**40), t=st.floats(0.1, 2.0),
       k=st.integers(0, VOCAB), top_p=st.floats(0.05, 1.0))
def test_sampled_token_survives_truncation_and_is_seed_deterministic(logits, seed, t, k, top_p):
    p = SamplingParams(temperature=t, top_k=k, top_p=top_p, seed=seed)
    draws = [sample(logits, p, [], [], (2,), torch.Generator().manual_seed(seed)) for _ in range(2)]
    assert draws[0] == draws[1]
    assert torch.isfinite(truncate(logits, p))[draws[0]]


def test_sampling_follows_the_softmax_distribution():
    """The exponential race samples from softmax(logits / T): frequencies within 3 sigma."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0] + [-30.0] * 4)
    p = SamplingParams(temperature=0.7)
    gen = torch.Generator().manual_seed(1234)
    n = 4000
    counts = torch.bincount(torch.tensor([sample(logits, p, [], [], (), gen) for _ in range(n)]), minlength=8)
    probs = torch.softmax(logits / 0.7, -1)
    sigma = torch.sqrt(n * probs * (1 - probs))
    assert bool(((counts - n * probs).abs() <= 3 * sigma + 1).all()), (counts, n * probs)


@given(logits=logits_rows(), token=st.integers(0, VOCAB - 1), k=st.integers(0, 8))
def test_logprob_entry(logits, token, k):
    lp = torch.log_softmax(logits, -1)
    entry = logprob_entry(lp, token, k, lambda t: None)
    assert next(iter(entry)) == token  # sampled token first
    assert set(torch.topk(lp, k).indices.tolist()) <= set(entry) if k else set(entry) == {token}
    for t, info in entry.items():
        assert info.rank == 1 + int((lp > lp[t]).sum())
        assert abs(info.logprob - float(lp[t])) < 1e-6
