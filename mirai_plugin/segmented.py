"""The predictor one group of segments at a time: group sizes from a memory budget, and the
autograd node that recomputes each group in the backward.

Legend: b batch, k supervised segments, r segments of one group, n tokens per segment,
d student width, o offsets.

The predictor attends within one segment, so its forward and backward can run on any
grouping of segments with the same result. When every segment's activations fit in the
budget the term runs in one pass and autograd keeps them, as for any module. Otherwise
``GroupedLosses`` computes the per-segment losses without keeping anything, and in the
backward runs each group again with gradients enabled and backpropagates it at once, so
one group's activations are alive at a time. The hidden states and the head's parameters
are the node's inputs: whatever autograd is asked (``backward()``, ``inputs=``,
``autograd.grad``, ``retain_graph``, the trainer's 1/A or a ``GradScaler`` scale) gets
what one pass gives, and ``.grad`` changes only where one pass changes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mirai_plugin.errors import MiraiError


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


@dataclass(frozen=True)
class Recompute:
    """What ``GroupedLosses`` gets besides tensors.

    Attributes:
        count: the hidden states among its tensors; the rest are the head's parameters, or one anchor.
        budget: ``activation_budget_mib``, for the messages.
        stand_in: ``stand_in(aliases)``: a context in which the head's calls use ``aliases`` (leaves on
            the parameters' storage, in their order) in place of its parameters.
        sharded: ``"fsdp"`` / ``"fsdp2"``: a sharded head, whose tensors end with an anchor.
    """

    count: int
    budget: float | None
    stand_in: Callable[[Sequence[nn.Parameter]], AbstractContextManager[None]] | None = None
    sharded: str = ""


class GroupedLosses(torch.autograd.Function):
    """Per-segment losses ``(k ...)`` from segment hidden states ``(b n d)`` each, one group at a time.

    ``GroupedLosses.apply(run, groups, how, *hidden, *params)``, ``how`` a ``Recompute``:
    ``run(rows, hidden)`` returns the losses of segments ``rows`` (stacked along dim 0); it is
    called under ``no_grad`` in the forward and again with gradients enabled in the backward, one
    group after another, each group backpropagated before the next runs.

    A replicated or DDP head passes its trainable parameters: their gradients are outputs of this
    node, as the hidden states' are, so autograd accumulates them (``backward()``), returns them
    (``autograd.grad``) or leaves them out (``inputs=``), as for a module run in one pass, and
    asks for only what it uses. The backward runs the groups on aliases of the parameters and
    accumulates into the aliases' ``.grad``: one group's activations and one gradient of the head
    are alive at a time, and the parameters' hooks (DDP's reduction) run once, when autograd
    accumulates this node's gradient.

    A sharded head (FSDP, FSDP2) gets its gradients from FSDP's own backward hooks, and its
    parameters are not in the autograd graph on either path. It passes one anchor leaf instead,
    used only by a full ``backward()``: then each group is backpropagated through the wrapper into
    the head, as in one pass; ``autograd.grad`` and ``backward(inputs=...)`` get the hidden
    states' gradients and leave the head alone.
    """

    @staticmethod
    def forward(ctx, run: RunGroup, groups: list[range], how: Recompute, *tensors: Tensor) -> Tensor:
        ctx.run, ctx.groups, ctx.how = run, groups, how
        # The backward runs outside the trainer's autocast region: recompute under the same one.
        device = tensors[0].device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(*tensors)  # the parameters too: updating one before the backward raises, as in one pass
        hidden = tensors[: how.count]
        return torch.cat([run(rows, [hidden[i] for i in rows]) for rows in groups])  # (k ...)

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        how: Recompute = ctx.how
        if torch.is_grad_enabled():  # create_graph=True: the groups' graphs are not kept
            raise MiraiError(
                f"a backward with create_graph=True through the foresight term needs the predictor's activations, "
                f"which activation_budget_mib={how.budget} does not keep: set activation_budget_mib=None"
            )
        saved = ctx.saved_tensors
        hidden, params = saved[: how.count], saved[how.count :]
        # The gradients this call uses (autograd.grad and backward(inputs=...) ask for some only).
        wanted = [needed and _engine_uses(edge) for needed, edge in zip(ctx.needs_input_grad[3:], ctx.next_functions)]
        into_sharded_head = bool(how.sharded) and wanted[-1]
        aliases = [] if how.sharded else [nn.Parameter(p.detach(), requires_grad=w)
                                          for p, w in zip(params, wanted[how.count :])]
        # Where backward() will add the gradient to an existing .grad, add it there from the start
        # (autograd then takes the sum back): no second copy of the head's gradients.
        taken = [j for j, (p, alias) in enumerate(zip(params, aliases))
                 if alias.requires_grad and p.grad is not None and _accumulates(p, ctx.next_functions[how.count + j])]
        for j in taken:
            aliases[j].grad, params[j].grad = params[j].grad, None
        device, autocast, autocast_dtype = ctx.autocast
        grads: list[Tensor | None] = [None] * len(saved)
        try:
            with nullcontext() if how.sharded or how.stand_in is None else how.stand_in(aliases):
                for rows in ctx.groups:
                    leaves = [hidden[i].detach().requires_grad_(wanted[i]) for i in rows]
                    inputs = [t for t in (*leaves, *aliases) if t.requires_grad]
                    if not (inputs or into_sharded_head):  # nothing of this group is asked for
                        continue
                    with torch.enable_grad(), torch.autocast(device, dtype=autocast_dtype, enabled=autocast):
                        losses = ctx.run(rows, leaves)  # (r ...)
                    grad = grad_losses[rows.start : rows.stop]
                    if into_sharded_head:
                        torch.autograd.backward(losses, grad)
                    else:
                        torch.autograd.backward(losses, grad, inputs=inputs)  # accumulates into the aliases
                    for i, leaf in zip(rows, leaves):
                        grads[i] = leaf.grad
        except BaseException:
            for j in taken:  # as far as it got, as a failed backward leaves a module's .grad
                params[j].grad = aliases[j].grad
            raise
        for j, alias in enumerate(aliases):
            grads[how.count + j] = alias.grad
        return None, None, None, *grads


def _accumulates(param: Tensor, edge: tuple) -> bool:
    """Whether the running backward adds the gradient sent along ``edge`` to ``param.grad``
    (``backward()``, not ``autograd.grad``) with no hook of ``param`` seeing it before."""
    try:
        return torch._C._will_engine_execute_node(edge[0]) and not param._backward_hooks
    except RuntimeError:  # torch.autograd.grad asks for this leaf: returned, not accumulated
        return False


def _engine_uses(edge: tuple) -> bool:
    """Whether the running backward uses the gradient sent along ``edge`` (a ``next_functions`` entry)."""
    node = edge[0]
    if node is None:
        return False
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:  # raised only for a leaf that torch.autograd.grad asks for: it is used
        return True
