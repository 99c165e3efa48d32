"""Collectives over the default process group, each a no-op without one.

A leaf module: the head, its optimizer, its checkpoints and the configs use these
without importing the data-parallel wrapping in ``mirai_plugin.distributed``.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import Tensor, nn


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
