"""fast engine scenarios: nano-vllm's known crashes, config errors, forks, aborts, metrics."""

from __future__ import annotations

import pytest

from conformance.compare import check_request_outputs
from fast import LLM, LLMEngine, SamplingParams
from fast.config import EngineConfig
from fast.core.request import SampleId
from fast.core.scheduler import Scheduler
from ref import LLM as RefLLM

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def assert_equal_to_oracle(model_dir, prompts, params, outputs, max_model_len):
    oracle = RefLLM(model_dir, max_model_len=max_model_len, max_batch=64)
    params = params if isinstance(params, list) else [params] * len(prompts)
    expected = oracle.generate(prompts, params)
    e = oracle.llm_engine
    check_request_outputs(e.model, e.model_config.eos_token_ids,
                          [(p["prompt_token_ids"], sp) for p, sp in zip(prompts, params)], expected, outputs)


def assert_all_free(llm: LLM):
    engine = llm.llm_engine
    engine.kv.check_invariants()
    assert engine.kv.num_free_blocks == engine.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_full_prefix_hit(tiny_model_dir):
    """A prompt whose blocks are all cached still computes its last token (nano-vllm #114)."""
    llm = LLM(tiny_model_dir, block_size=8, max_model_len=128)
    prompt = {"prompt_token_ids": list(range(10, 42))}  # 32 tokens: 4 full blocks
    first = llm.generate(prompt, GREEDY, use_tqdm=False)
    hits_before = llm.llm_engine.kv.stats.hits
    second = llm.generate(prompt, GREEDY, use_tqdm=False)
    assert llm.llm_engine.kv.stats.hits - hits_before == 24  # capped: the last block is recomputed
    assert first[0].outputs[0].token_ids == second[0].outputs[0].token_ids
    assert_equal_to_oracle(tiny_model_dir, [prompt], GREEDY, second, 128)
    assert_all_free(llm)


def test_preemption_mid_prefill_gives_the_unpreempted_output(tiny_model_dir, monkeypatch):
    preempted_at = []
    original = Scheduler._preempt

    def spy(self, request, out, **kw):
        preempted_at.append((request.num_computed_tokens, request.num_tokens))
        original(self, request, out, **kw)

    monkeypatch.setattr(Scheduler, "_preempt", spy)
    llm = LLM(tiny_model_dir, max_model_len=64, block_size=4, num_kv_blocks=16, max_num_seqs=4,
              max_num_batched_tokens=8, enable_prefix_caching=False)
    prompts = [{"prompt_token_ids": [5 + i] * 30} for i in range(3)]
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=30, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.llm_engine.get_metrics().num_preemptions > 0
    assert any(computed < total for computed, total in preempted_at), "no preemption hit a prefill"
    assert_equal_to_oracle(tiny_model_dir, prompts, params, outs, 64)
    assert_all_free(llm)


def test_cache_that_fits_exactly_one_request(tiny_model_dir):
    llm = LLM(tiny_model_dir, max_model_len=64, block_size=16, num_kv_blocks=4, max_num_seqs=4)
    prompts = [{"prompt_token_ids": [7 + i] * 40} for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)  # 64 tokens each
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 24 for o in outs)
    assert_equal_to_oracle(tiny_model_dir, prompts, params, outs, 64)
    assert_all_free(llm)


def test_request_that_fits_no_cache_is_rejected_not_stuck(tiny_model_dir):
    llm = LLM(tiny_model_dir, max_model_len=64, block_size=16, num_kv_blocks=4)
    with pytest.raises(ValueError, match=r"prompt length must be <= max_model_len \(64\)"):
        llm.generate([{"prompt_token_ids": [3] * 10}, {"prompt_token_ids": [3] * 65}], GREEDY)
    assert not llm.llm_engine.has_unfinished_requests()
    out = llm.generate({"prompt_token_ids": [3] * 10}, GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 12


@pytest.mark.parametrize("options,match", [
    (dict(max_num_seqs=8, max_num_batched_tokens=4), r"max_num_batched_tokens \(4\) must be >= max_num_seqs \(8\)"),
    (dict(enable_chunked_prefill=False, max_num_batched_tokens=32, max_num_seqs=8, max_model_len=64),
     r"must be >= max_model_len \(64\) when chunked prefill is off"),
    (dict(num_kv_blocks=3, block_size=16, max_model_len=64), r"KV cache too small.*need num_kv_blocks >= 4"),
    (dict(kv_cache_memory=1000, max_model_len=64), r"kv_cache_memory >= \d+ bytes"),
    (dict(policy="lifo"), r"policy must be one of"),
    (dict(attention_backend="cuda-magic"), r"cuda-magic"),
    (dict(block_size=0), r"block_size must be >= 1"),
    (dict(max_num_seqs=2, max_num_batched_tokens=1), r"max_num_batched_tokens"),
])
def test_config_errors(tiny_model_dir, options, match):
    with pytest.raises(ValueError, match=match):
        LLM(tiny_model_dir, **options)


def test_unknown_option_is_an_error(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown engine option.*max_num_seq'"):
        LLM(tiny_model_dir, max_num_seq=4)


def test_n_samples_share_prompt_blocks(tiny_model_dir):
    engine = LLMEngine(EngineConfig(model=tiny_model_dir, block_size=4, max_model_len=64))
    params = SamplingParams(n=3, seed=5, max_tokens=6, ignore_eos=True)
    engine.add_request("r", {"prompt_token_ids": list(range(20, 30))}, params)  # 10 tokens: 2 full blocks
    engine.step()
    tables = [engine.kv.get_block_table(SampleId("r", i)) for i in range(3)]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]  # full prompt blocks shared
    assert len({t[2] for t in tables}) == 3  # the partly filled block was copied per sample
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert_equal_to_oracle(tiny_model_dir, [{"prompt_token_ids": list(range(20, 30))}], params, outs, 64)
    assert engine.kv.num_free_blocks == engine.num_blocks


def test_abort_frees_everything(tiny_model_dir):
    engine = LLMEngine(EngineConfig(model=tiny_model_dir, block_size=4, max_model_len=64, max_num_seqs=2))
    for i in range(4):
        engine.add_request(str(i), {"prompt_token_ids": [3 + i] * 20}, SamplingParams(n=2, seed=i, max_tokens=10))
    engine.step()
    engine.abort_request(["0", "3"])
    engine.step()
    engine.abort_request("1")
    seen = set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == "2"
            seen.add(out.request_id)
    assert seen == {"2"}
    assert engine.kv.num_free_blocks == engine.num_blocks
    engine.kv.check_invariants()


def test_metrics(tiny_model_dir):
    llm = LLM(tiny_model_dir, max_model_len=128)
    llm.generate([{"prompt_token_ids": [9] * 20}] * 3, GREEDY, use_tqdm=False)
    assert llm.llm_engine.get_metrics().prefix_cache_hit_rate == 0  # admitted together: nothing cached yet
    llm.generate([{"prompt_token_ids": [9] * 20}], GREEDY, use_tqdm=False)
    m = llm.llm_engine.get_metrics()
    assert m.num_generated_tokens == 48 and m.num_running == 0 and m.num_waiting == 0
    assert m.prefix_cache_hit_rate > 0  # the later identical prompt reuses the first block
    assert len(m.ttft_s) == 4 and len(m.tpot_s) == 4 and m.generation_tokens_per_s > 0


def test_same_api_as_ref(tiny_model_dir):
    fast_out = LLM(tiny_model_dir).generate("Once upon a time", SamplingParams(temperature=0, max_tokens=8),
                                            use_tqdm=False)
    ref_out = RefLLM(tiny_model_dir).generate("Once upon a time", SamplingParams(temperature=0, max_tokens=8))
    assert fast_out[0].outputs[0].text == ref_out[0].outputs[0].text
    assert fast_out[0].prompt_token_ids == ref_out[0].prompt_token_ids
