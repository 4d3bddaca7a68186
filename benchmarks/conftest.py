"""Fixtures shared by the benchmark files: the scale (smoke under --benchmark-disable, as CI runs
them; full otherwise) and the checkpoint of that scale."""

from __future__ import annotations

import pytest

from benchmarks.workloads import model_dir


@pytest.fixture(scope="session")
def scale(request) -> str:
    return "smoke" if request.config.getoption("benchmark_disable", False) else "full"


@pytest.fixture(scope="session")
def bench_model(scale) -> str:
    return model_dir(scale)
