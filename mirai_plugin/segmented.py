"""The predictor one group of segments at a time: group sizes from a memory budget, and the
autograd node that recomputes each group in the backward.

Legend: b batch, k supervised segments, r segments of one group, n tokens per segment,
d student width, o offsets.

The predictor attends within one segment, so its forward and backward can run on any
grouping of segments with the same result. When every segment's activations fit in the
budget the term runs in one pass and autograd keeps them, as for any module. Otherwise
``GroupedLosses`` computes the per-segment losses without keeping anything, and in the
backward runs each group again with gradients enabled and backpropagates it at once, so
one group's activations are alive at a time; the generator receives d(loss)/d(hidden)
through this one node. The gradient that reaches the node (the trainer's 1/A, a
``GradScaler`` scale, or none when the backward is skipped) reaches the head's
parameters unchanged, because their gradients come from that backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SegmentGroup:
    """Segments whose losses run in one predictor call; the head's ``forward`` takes it so a
    DDP/FSDP wrapper sees the call. Targets are either materialised (``target``) or read from
    the encoder's segments (``z`` with ``source``: ``mean_target_cosine``)."""

    hidden: Tensor  # (b r n d)
    valid: Tensor  # (r o)
    tokens_per_frame: int
    checkpoint_blocks: bool = False
    target: Tensor | None = None  # (b r ...)
    z: Tensor | None = None  # (b K n e)
    source: Tensor | None = None  # (r o)


@dataclass(frozen=True)
class GroupPlan:
    """How the segments of one step go through the predictor.

    Attributes:
        size: segments per group (all of them for one pass).
        recompute: the groups run in ``GroupedLosses``'s backward (False: one pass, activations kept).
        checkpoint_blocks: one segment is over the budget: each predictor block is also recomputed.
    """

    size: int
    recompute: bool
    checkpoint_blocks: bool


def plan_groups(count: int, segment_bytes: int, segment_bytes_checkpointed: int, budget: int | None) -> GroupPlan:
    """The plan for ``count`` segments that keep ``segment_bytes`` each for backward
    (``segment_bytes_checkpointed`` with block checkpointing) under ``budget`` bytes (None: no bound).

    >>> plan_groups(7, 100, 40, None) == plan_groups(7, 100, 40, 700) == GroupPlan(7, False, False)
    True
    >>> plan_groups(7, 100, 40, 250)
    GroupPlan(size=2, recompute=True, checkpoint_blocks=False)
    >>> plan_groups(7, 100, 40, 90)
    GroupPlan(size=2, recompute=True, checkpoint_blocks=True)
    """
    if budget is None or count * segment_bytes <= budget:
        return GroupPlan(size=max(count, 1), recompute=False, checkpoint_blocks=False)
    if segment_bytes <= budget:
        return GroupPlan(size=budget // segment_bytes, recompute=True, checkpoint_blocks=False)
    return GroupPlan(size=max(1, budget // segment_bytes_checkpointed), recompute=True, checkpoint_blocks=True)


def groups_of(count: int, size: int) -> list[range]:
    """``range(count)`` cut into consecutive groups of ``size``."""
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


RunGroup = Callable[[range, Sequence[Tensor]], Tensor]


class GroupedLosses(torch.autograd.Function):
    """Per-segment losses ``(k ...)`` from segment hidden states ``(b n d)`` each, one group at a time.

    ``run(rows, hidden)`` returns the losses of segments ``rows`` (stacked along dim 0) from
    their hidden states; it is called under ``no_grad`` in the forward and again with
    gradients enabled in the backward, where its result is backpropagated immediately (the
    head's parameters accumulate their gradients there, through any DDP/FSDP wrapper that
    ``run`` goes through). ``anchor`` is a scalar that requires grad, so that the node
    exists whenever gradients are enabled, even for hidden states that do not need them.
    """

    @staticmethod
    def forward(ctx, run: RunGroup, groups: list[range], anchor: Tensor, *hidden: Tensor) -> Tensor:
        ctx.run, ctx.groups = run, groups
        # The backward runs outside the trainer's autocast region: recompute under the same one.
        device = hidden[0].device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(*hidden)
        return torch.cat([run(rows, [hidden[i] for i in rows]) for rows in groups])  # (k ...)

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        hidden = ctx.saved_tensors
        device, autocast, autocast_dtype = ctx.autocast
        grads: list[Tensor | None] = [None] * len(hidden)
        for rows in ctx.groups:
            leaves = [hidden[i].detach().requires_grad_(hidden[i].requires_grad) for i in rows]
            with torch.enable_grad(), torch.autocast(device, dtype=autocast_dtype, enabled=autocast):
                losses = ctx.run(rows, leaves)  # (r ...)
            torch.autograd.backward(losses, grad_losses[rows.start : rows.stop])
            for i, leaf in zip(rows, leaves):
                grads[i] = leaf.grad
        return None, None, None, *grads
