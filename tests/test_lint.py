"""Lint and type checks run with the tests, so CI enforces them: ruff over the repository,
mypy (``--check-untyped-defs``, see pyproject.toml) over the installed core."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_ruff_passes():
    assert shutil.which("ruff") or _run(sys.executable, "-m", "ruff", "--version").returncode == 0, (
        "ruff is missing: pip install -e '.[test]'")
    result = _run(sys.executable, "-m", "ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_passes_on_the_core():
    result = _run(sys.executable, "-m", "mypy")  # files and options: [tool.mypy] in pyproject.toml
    assert result.returncode == 0, result.stdout + result.stderr
