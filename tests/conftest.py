import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device for the tests that take the `device` fixture (e.g. cuda)")


@pytest.fixture
def device(request) -> torch.device:
    """``--device`` (default cpu): tests that take it run their tensors and heads there."""
    chosen = torch.device(request.config.getoption("--device"))
    if chosen.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda given but no CUDA device is available")
    return chosen


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group, for wrappers (DDP, FSDP) that need one."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def all_hooks(module: torch.nn.Module) -> int:
    """Number of forward hooks and pre-hooks on every submodule (hooks with kwargs included)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
