"""The prepared GPU check runs at reduced sizes on a CPU, so it cannot rot between GPU runs."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
UNDER_TEST = {**os.environ, "PYTHON": sys.executable}  # the interpreter running the tests, whatever `python` is


def test_gpu_check_smoke_prints_every_row():
    result = subprocess.run(["bash", "benchmarks/gpu/check.sh", "--smoke"], capture_output=True, text=True, cwd=ROOT,
                            env={**UNDER_TEST, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    table = {(what.strip(), quantity.strip()): float(value) for what, quantity, value, _ in rows[1:]}
    for dtype in ("float32", "bfloat16"):
        for step in ("generator", "critic"):
            assert table[(f"head, {step} step ({dtype})", "time")] > 0
        assert (f"fused loss, forward + backward ({dtype})", "peak above inputs") in table
    ratio = table[("generator step + foresight term", "time ratio")]
    assert math.isfinite(ratio) and ratio > 0  # measured, not judged: at smoke sizes on a busy CPU it is noise
    for precision in ("float32, TF32", "float32", "bfloat16"):
        assert table[(f"head, one segment, one pass ({precision})", "time")] > 0
    official = [key for key in table if key[0].startswith("official projector, one segment (bf16)")]
    assert len(official) == 1, table.keys()
    if os.environ.get("MIRAI_VIDEO_MIRAI_DIR"):  # the archives' checkout (CI): the official row is measured
        assert table[official[0]] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the check runs for real")
def test_gpu_check_without_cuda_says_so():
    result = subprocess.run(["bash", "benchmarks/gpu/check.sh", "--device", "cuda:0"], capture_output=True, text=True,
                            cwd=ROOT, env=UNDER_TEST, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: no CUDA device")


def test_check_sh_runs_with_the_interpreter_under_test(tmp_path):
    decoy = tmp_path / "bin" / "python"  # another interpreter first on the PATH
    decoy.parent.mkdir()
    decoy.write_text("#!/bin/sh\necho 'not the interpreter under test' >&2\nexit 3\n")
    decoy.chmod(0o755)
    env = {**UNDER_TEST, "PATH": f"{decoy.parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "benchmarks/gpu/check.sh", "--help"], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=120)
    assert result.returncode == 0 and "--smoke" in result.stdout, result.stderr[-2000:]
    env.pop("PYTHON")  # without PYTHON the script runs `python` from the PATH, as a user's shell would
    result = subprocess.run(["bash", "benchmarks/gpu/check.sh", "--help"], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=120)
    assert result.returncode == 3 and "not the interpreter under test" in result.stderr
