"""Data parallelism for the foresight head: replicated, DDP, FSDP1 or FSDP2.

The generator may be wrapped however the trainer likes: ``capture_hidden`` finds
its blocks through DDP/FSDP wrappers, and ``FrozenEncoder`` runs the encoder the
trainer already has (FSDP-wrapped or not) without wrapping it again.

The head is a separate module. By default it is *replicated*: broadcast from rank 0
once, its gradients averaged across ranks inside ``head.step()`` and ``head.replay()``.
``shard_head`` puts it under DDP, FSDP1 or FSDP2 instead (the official trainer
FSDP-wraps its projector); the head then routes its own forward — the foresight
term and every replay backward — through the wrapper, steps the right optimizer and
clips with the wrapper's global norm. Either way you keep calling the head.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

# The collectives lived here before 0.2.0; still importable from this module.
from mirai_plugin.collectives import (
    average_gradients,
    broadcast_module,
    gather_ints,
    gather_messages,
    log_once,
    world,
)
from mirai_plugin.errors import MiraiError
from mirai_plugin.head import ForesightHead
from mirai_plugin.optimizer import STRATEGIES

__all__ = ["STRATEGIES", "average_gradients", "broadcast_module", "gather_ints", "gather_messages", "log_once",
           "shard_head", "world"]



def shard_head(head: nn.Module, strategy: str, **wrap_kwargs: Any) -> nn.Module:
    """Put a ``ForesightHead`` under a data-parallel strategy; call once, before its first step.

    Args:
        head: the ``ForesightHead``.
        strategy: ``"replicate"`` (the default behaviour, no wrapper), ``"ddp"``
            (``DistributedDataParallel``), ``"fsdp"`` (FSDP1
            ``FullyShardedDataParallel``; pass e.g. ``auto_wrap_policy``,
            ``mixed_precision``, ``device_id``) or ``"fsdp2"`` (``fully_shard``; pass
            e.g. ``mp_policy``).
        wrap_kwargs: handed to the wrapper unchanged.

    Returns:
        the wrapper for ``"ddp"`` / ``"fsdp"`` (keep it alive; the head routes its
        forward through it), the head itself for ``"replicate"`` / ``"fsdp2"``.
        Keep using the head object: ``head(captured, z)``, ``head.step()``,
        ``head.replay()``, ``head.training_state()``.
    """
    if not isinstance(head, ForesightHead):
        raise MiraiError(f"shard_head takes the ForesightHead itself, got {type(head).__name__}")
    head.optimization.check_attachable(strategy)
    if strategy != "replicate" and not (dist.is_available() and dist.is_initialized()):
        raise MiraiError(
            f"strategy {strategy!r} needs an initialised process group (torch.distributed.init_process_group)"
        )

    broadcast_module(head)
    wrapper: nn.Module | None = None
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapper = DistributedDataParallel(head, **wrap_kwargs)
    elif strategy == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapper = FullyShardedDataParallel(head, **wrap_kwargs)
    elif strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(head, **wrap_kwargs)
    head.optimization.attach(strategy, wrapper)
    return wrapper if wrapper is not None else head
