"""What the CPU harnesses stand in for, checked on plain torch (no checkout needed).

``hybrid_full`` (FSDP1 HYBRID_SHARD without a process group, as the upstreams' ``fsdp_wrap`` passes it) on
one CPU host: ``hybrid_shard_repro.py`` shows why the harnesses answer ``device_count()`` with the ranks per
node (``upstream.devices_per_node_as_on_gpus``), and that HYBRID_SHARD then averages as FULL_SHARD does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPRO = HERE / "hybrid_shard_repro.py"


def repro(tmp_path: Path, nproc: int, *args: str) -> dict:
    out = tmp_path / f"hybrid_{nproc}.pt"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), str(REPRO),
                           str(out), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out, weights_only=False)


def test_hybrid_shard_on_one_cpu_host_keeps_each_ranks_own_half_gradient(tmp_path):
    """Two ranks: as torch answers on a CPU (one device per node), HYBRID_SHARD falls back to NO_SHARD and
    leaves each rank its own gradient / 2 (the "0.5x gradients"), not the mean over ranks; with the ranks per
    node answered as a GPU node does, it equals FULL_SHARD exactly (both reduce-scatter over the same two
    ranks)."""
    result = repro(tmp_path, 2)
    local, mean = result["local"], sum(result["local"]) / 2
    torch.testing.assert_close(result["full_shard"], mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(result["as_torch_answers"], local[0] / 2, rtol=0, atol=0)  # rank 0's own, halved
    assert not torch.allclose(result["as_torch_answers"], mean, rtol=1e-3)
    assert any("NO_SHARD" in message for message in result["warnings"]), result["warnings"]
    assert torch.equal(result["gpu_node"], result["full_shard"])


def test_hybrid_shard_across_two_nodes_averages_over_all_ranks(tmp_path):
    """Four ranks as two nodes of two devices: HYBRID_SHARD shards within a node and all-reduces across the
    nodes, which is the mean over the four ranks (the sums run in another order than FULL_SHARD's)."""
    result = repro(tmp_path, 4, "--devices-per-node", "2")
    mean = sum(result["local"]) / 4
    torch.testing.assert_close(result["full_shard"], mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(result["gpu_node"], mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(result["as_torch_answers"], result["local"][0] / 4, rtol=0, atol=0)
