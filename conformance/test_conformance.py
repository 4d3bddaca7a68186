"""The suite as pytest tests: `pytest --pyargs conformance` (or add this module to a project's CI).

Environment: CONFORMANCE_ENGINE (ref | fast | hf | hf-cb | module:factory; default fast),
CONFORMANCE_MODEL (checkpoint dir; default the embedded tiny model), CONFORMANCE_PROFILE
(quick | full | deep; default quick). A check whose hook the engine lacks is skipped.
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
    from conformance.adapters import load_adapter
    from conformance.tiers import MAX_MODEL_LEN, PROFILES, Context

    engine = os.environ.get("CONFORMANCE_ENGINE", "fast")
    model = os.environ.get("CONFORMANCE_MODEL")
    if model is None:
        from ref.models import tiny_checkpoint

        model = str(tiny_checkpoint())
    make = lambda d, **o: load_adapter(engine, d, **o)  # noqa: E731
    return Context(adapter=make(model, max_model_len=MAX_MODEL_LEN), model_dir=model,
                   profile=PROFILES[os.environ.get("CONFORMANCE_PROFILE", "quick")], make_adapter=make)


@pytest.mark.parametrize("check", CHECKS, ids=[f"{c.tier}/{c.name}" for c in CHECKS])
def test_conformance(conformance_context, check):
    from conformance.runner import run_check

    result = run_check(check, conformance_context, seed=None, shrink=True, replay="")
    if result.status == "n/a":
        pytest.skip(result.message)
    assert result.status == "passed", result.message
