"""fast vs the oracle on random workloads: equal outputs under the SPEC rule, no leaked blocks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance.compare import check_request_outputs
from conformance.driver import run_workload
from conformance.workloads import fast_engine_options, workloads
from fast import LLMEngine
from fast.config import EngineConfig
from ref import LLM as RefLLM

MAX_MODEL_LEN = 128


@pytest.fixture(scope="module")
def oracle(tiny_model_dir):
    return RefLLM(tiny_model_dir, max_model_len=MAX_MODEL_LEN, max_batch=64)


# "auto" is the C++ cpu kernel on CPU (the default users run), "torch" the fallback.
@given(workload=workloads(max_requests=24, max_model_len=MAX_MODEL_LEN), options=fast_engine_options(MAX_MODEL_LEN),
       backend=st.sampled_from(["auto", "torch"]))
def test_fast_equals_oracle(tiny_model_dir, oracle, workload, options, backend):
    engine = LLMEngine(EngineConfig(model=tiny_model_dir, attention_backend=backend, **options))
    step_check = lambda: engine.scheduler.check_invariants()  # noqa: E731
    got = run_workload(engine, workload, on_step=step_check)  # every request finished, reported once
    keep = sorted(got)
    expected = oracle.generate([workload.prompts[i] for i in keep], [workload.params[i] for i in keep])
    ref_engine = oracle.llm_engine
    check_request_outputs(ref_engine.model, ref_engine.model_config.eos_token_ids,
                          [(workload.prompts[i]["prompt_token_ids"], workload.params[i]) for i in keep],
                          expected, [got[i] for i in keep])
    engine.kv.check_invariants()
    assert engine.kv.num_free_blocks == engine.num_blocks, "blocks leaked after the workload"
