"""Shared by tests/ and benchmarks/: Hypothesis profiles `ci` (modest, `make test`), `dev`, `deep`, and fixtures.

Select with HYPOTHESIS_PROFILE=ci|dev|deep.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=15, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "deep", max_examples=1000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir():
    """The embedded default model (llama family), written once per cache."""
    from ref.models import tiny_checkpoint

    return str(tiny_checkpoint())


@pytest.fixture(scope="session")
def ref_llm(tiny_model_dir):
    from ref import LLM

    return LLM(tiny_model_dir)
