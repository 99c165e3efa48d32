"""The guard that keeps CI's integration tests from silently dropping out (integration_tests/conftest.py):
without a checkout they skip, naming the variable; under MIRAI_REQUIRE_UPSTREAMS=1 that fails the run."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = "integration_tests/test_official_capture.py"  # reads MIRAI_VIDEO_MIRAI_DIR and MIRAI_SELF_FORCING_DIR


def run_without_checkouts(tmp_path, *args, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MIRAI_")}
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", TESTS, *args],
        capture_output=True, text=True, cwd=ROOT, env={**clean, "MIRAI_UPSTREAM_REPORT": str(report), **env},
        timeout=120,
    )
    return result, json.loads(report.read_text())


def test_missing_checkouts_skip_naming_the_variable(tmp_path):
    result, counts = run_without_checkouts(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MIRAI_VIDEO_MIRAI_DIR is not set" in result.stdout and "MIRAI_SELF_FORCING_DIR is not set" in result.stdout
    assert counts["passed"] == 0 and len(counts["skipped"]) == 2


def test_required_checkouts_that_are_missing_fail_the_run(tmp_path):
    result, counts = run_without_checkouts(tmp_path, MIRAI_REQUIRE_UPSTREAMS="1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "integration tests that did not run" in result.stdout
    assert "test_capture_on_the_unmodified_self_forcing_rollout: skipped" in result.stdout
    assert len(counts["skipped"]) == 2


def test_required_integration_tests_cannot_be_deselected(tmp_path):
    result, counts = run_without_checkouts(tmp_path, "-k", "nothing_matches_this", MIRAI_REQUIRE_UPSTREAMS="1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert len(counts["deselected"]) == 2 and counts["passed"] == 0
