"""The CLI itself: table, exit code, JSON report, and judging an engine we did not write."""

from __future__ import annotations

import json

from conformance.__main__ import main


def test_cli_on_fast_writes_a_passing_report(tmp_path, capsys):
    report = tmp_path / "report.json"
    code = main(["--tier", "robustness", "--tier", "determinism", "--report", str(report)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "tier" in out and "robustness" in out and "PASSED" in out
    doc = json.loads(report.read_text())
    assert doc["passed"] and doc["engine"] == "fast"
    assert {c["check"] for c in doc["checks"]} >= {"bad_requests_rejected", "batch_invariance"}
    assert all(c["replay"].startswith("python -m conformance --engine fast") for c in doc["checks"])


def test_cli_reports_a_third_party_failure_with_exit_code_1(tmp_path, capsys):
    """transformers' generate does not validate token ids: the suite says so and fails."""
    report = tmp_path / "hf.json"
    code = main(["--engine", "hf", "--check", "bad_requests_rejected", "--no-shrink", "--report", str(report)])
    out = capsys.readouterr().out
    assert code == 1
    doc = json.loads(report.read_text())
    failed = [c for c in doc["checks"] if c["status"] == "failed"]
    assert failed and "bad" in failed[0]["message"]
    assert "FAILED" in out


def test_unknown_engine_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="--engine must be one of"):
        main(["--engine", "vllm", "--tier", "robustness"])
