"""Minimal reproduction: FSDP1 ``HYBRID_SHARD`` without a process group on a CPU host (gloo).

    torchrun --nproc_per_node 2 integration_tests/hybrid_shard_repro.py OUT.pt
    torchrun --nproc_per_node 4 integration_tests/hybrid_shard_repro.py OUT.pt --devices-per-node 2

A two-layer model, the same weights on every rank, a different batch per rank, wrapped as the upstream
``fsdp_wrap`` wraps (size-based auto-wrap, ``use_orig_params``, ``device_id`` the CPU, no process group);
the full gradients after one backward, under FULL_SHARD and under HYBRID_SHARD:

- ``as_torch_answers``: FSDP sizes a node by the device handle's ``device_count()``, which is 1 for the
  CPU. Each rank is then a node of one, FSDP switches the one-rank shard group to NO_SHARD, and that path
  all-reduces over the shard group only: the all-reduce across nodes is lost, while the gradient is
  still divided by the whole data-parallel world. Each rank keeps its own gradient / world size.
- ``gpu_node``: with ``device_count()`` answering the ranks per node (what ``torch.cuda.device_count()``
  answers on a GPU node, one rank per device; ``--devices-per-node``, default torchrun's
  ``LOCAL_WORLD_SIZE``), HYBRID_SHARD shards within the node and all-reduces across nodes.

Rank 0 writes ``{"local": [rank's own gradient per rank], "full_shard", "as_torch_answers", "gpu_node",
"warnings"}`` (flattened gradients) to OUT.pt.
"""

from __future__ import annotations

import argparse
import functools
import os
import warnings

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))


def flat_grads(module: torch.nn.Module) -> torch.Tensor:
    if isinstance(module, FSDP):
        with FSDP.summon_full_params(module, with_grads=True):
            return torch.cat([p.grad.flatten().clone() for p in module.parameters()])
    return torch.cat([p.grad.flatten().clone() for p in module.parameters()])


def fsdp_grads(strategy: ShardingStrategy, batch: torch.Tensor) -> torch.Tensor:
    wrapped = FSDP(model(), sharding_strategy=strategy, device_id=torch.device("cpu"), use_orig_params=True,
                   auto_wrap_policy=functools.partial(size_based_auto_wrap_policy, min_num_params=50),
                   sync_module_states=False)
    wrapped(batch).square().sum().backward()
    return flat_grads(wrapped)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices-per-node", type=int, default=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(100 + rank)
    batch = torch.randn(3, 8)  # a different batch per rank

    plain = model()
    plain(batch).square().sum().backward()
    local = flat_grads(plain)
    gathered = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)

    result = {"local": gathered, "full_shard": fsdp_grads(ShardingStrategy.FULL_SHARD, batch)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result["as_torch_answers"] = fsdp_grads(ShardingStrategy.HYBRID_SHARD, batch)
    result["warnings"] = sorted({str(w.message) for w in caught if "HYBRID_SHARD" in str(w.message)})
    device_count = torch.cpu.device_count
    torch.cpu.device_count = lambda: args.devices_per_node
    try:
        result["gpu_node"] = fsdp_grads(ShardingStrategy.HYBRID_SHARD, batch)
    finally:
        torch.cpu.device_count = device_count
    if rank == 0:
        torch.save(result, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
