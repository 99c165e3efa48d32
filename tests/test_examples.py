"""The examples run, and the torchrun example resumes exactly across a process restart."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(*args, nproc=None):
    launcher = [sys.executable] if nproc is None else [sys.executable, "-m", "torch.distributed.run",
                                                       "--nproc_per_node", str(nproc)]  # fmt: skip
    result = subprocess.run(
        launcher + [str(a) for a in args], capture_output=True, text=True, cwd=EXAMPLES, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [line for line in result.stdout.splitlines() if line.startswith("step")]


def test_plain_loop_trains():
    lines = run(EXAMPLES / "plain_loop.py")
    assert len(lines) == 5 and "foresight" in lines[-1]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_torchrun_loop_same_numbers_under_fsdp_and_fsdp2_and_after_a_restart(tmp_path):
    script = EXAMPLES / "torchrun_loop.py"
    straight = run(script, "--strategy", "fsdp", "--steps", 8, nproc=2)
    assert len(straight) == 8 and "weight 2.0" in straight[3] and "weight 1.0" in straight[4]  # 2 -> 1 half-way
    assert run(script, "--strategy", "fsdp2", "--steps", 8, nproc=2) == straight
    checkpoint = tmp_path / "run.pt"
    first = run(script, "--strategy", "fsdp", "--steps", 4, "--save", checkpoint, nproc=2)
    resumed = run(script, "--strategy", "fsdp", "--steps", 4, "--resume", checkpoint, nproc=2)
    assert first + resumed == straight
