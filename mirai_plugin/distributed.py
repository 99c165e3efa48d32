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

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mirai_plugin.errors import MiraiError

STRATEGIES = ("replicate", "ddp", "fsdp", "fsdp2")


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_SAID: set[str] = set()


def log_once(message: str, level: int = logging.WARNING) -> None:
    """Log ``message`` through the ``mirai_plugin`` logger, once per process, on rank 0 only
    (never into the trainer's own metric logs)."""
    if message in _SAID:
        return
    _SAID.add(message)
    if world()[0] == 0:
        logging.getLogger("mirai_plugin").log(level, message)


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (ranks seed differently)."""
    if world()[1] > 1:
        with torch.no_grad():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=src)


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
    from mirai_plugin.head import ForesightHead

    if not isinstance(head, ForesightHead):
        raise MiraiError(f"shard_head takes the ForesightHead itself, got {type(head).__name__}")
    if strategy not in STRATEGIES:
        raise MiraiError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if head._strategy != "replicate" or head._wrapper is not None:
        raise MiraiError(f"the head is already under {head._strategy!r}; call shard_head once")
    if head._optimizer is not None and head._optimizer.state:
        raise MiraiError(
            "the head's optimizer has already stepped: shard the head right after building it "
            "(or after load, before the first step) so its optimizer is built over the sharded parameters"
        )
    if strategy != "replicate" and not (dist.is_available() and dist.is_initialized()):
        raise MiraiError(f"strategy {strategy!r} needs an initialised process group (torch.distributed.init_process_group)")

    broadcast_module(head)
    head._optimizer = None
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapper = DistributedDataParallel(head, **wrap_kwargs)
    elif strategy == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapper = FullyShardedDataParallel(head, **wrap_kwargs)
    elif strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(head, **wrap_kwargs)
        wrapper = None
    else:
        wrapper = None
    head._strategy = strategy
    head._wrapper_ref = (wrapper,) if wrapper is not None else ()
    return wrapper if wrapper is not None else head


# ---------------------------------------------------------------- collectives


def average_gradients(parameters: list[nn.Parameter]) -> None:
    """Replicated head: every rank steps with the mean gradient (zeros where a rank has none)."""
    if world()[1] == 1 or not parameters:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world()[1]
    offset = 0
    for p, g in zip(parameters, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def gather_ints(values: list[int], device: torch.device) -> Tensor:
    """``(world, len(values))``: every rank's ``values`` (a tensor on ``device`` for NCCL)."""
    local = torch.tensor(values, dtype=torch.int64, device=device)
    if world()[1] == 1:
        return local[None]
    out = [torch.empty_like(local) for _ in range(world()[1])]
    dist.all_gather(out, local)
    return torch.stack(out)


def gather_messages(message: str | None) -> list[str | None]:
    """Every rank's message (rare path: only after a rank reported a problem)."""
    if world()[1] == 1:
        return [message]
    out: list[str | None] = [None] * world()[1]
    dist.all_gather_object(out, message)
    return out
