"""The suite as pytest tests: `pytest --pyargs conformance` (or add this module to a project's CI).

Environment: CONFORMANCE_ENGINE (ref | fast | hf | hf-cb | module:factory; default fast),
CONFORMANCE_MODEL (checkpoint dir; default the embedded tiny model), CONFORMANCE_PROFILE
(quick | full | deep; default quick), CONFORMANCE_TIMEOUT (seconds per check; default per
profile). As with the CLI, the engine runs in its own process. A check whose hook the engine
lacks is skipped.
"""

from __future__ import annotations

import os

import pytest

from conformance.tiers import CHECKS


@pytest.fixture(scope="module")
def conformance_context():
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from conformance.adapters import check_engine_spec
    from conformance.isolation import EngineHost
    from conformance.runner import CHECK_TIMEOUT_S
    from conformance.tiers import MAX_MODEL_LEN, PROFILES, Context

    engine = os.environ.get("CONFORMANCE_ENGINE", "fast")
    check_engine_spec(engine)
    model = os.environ.get("CONFORMANCE_MODEL")
    if model is None:
        from ref.models import tiny_checkpoint

        model = str(tiny_checkpoint())
    profile = os.environ.get("CONFORMANCE_PROFILE", "quick")
    timeout = float(os.environ.get("CONFORMANCE_TIMEOUT", CHECK_TIMEOUT_S[profile]))
    host = EngineHost(engine, model, {"max_model_len": MAX_MODEL_LEN})
    ctx = Context(adapter=None, model_dir=model, profile=PROFILES[profile], make_adapter=host.make_adapter)
    yield ctx, host, timeout
    host.close()


@pytest.mark.parametrize("check", CHECKS, ids=[f"{c.tier}/{c.name}" for c in CHECKS])
def test_conformance(conformance_context, check):
    from conformance.runner import run_check

    ctx, host, timeout = conformance_context
    result = run_check(check, ctx, seed=None, shrink=True, replay="", engine=host, timeout=timeout)
    if result.status == "n/a":
        pytest.skip(result.message)
    assert result.status == "passed", result.message
