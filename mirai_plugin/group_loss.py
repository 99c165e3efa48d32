"""Predictor -> loss for one group of segments, and the diagnosis of a non-finite term.

Legend (docs/design.md): b batch, r segments of one group, o offsets, n tokens per
segment, f frames of one segment, s tokens per frame, d student width, e encoder width.

``group_losses`` turns a ``SegmentGroup`` into per-segment ``(r)`` losses (fusion
``mean``) or per-pair ``(r o)`` losses; ``predict`` is the head's predictor then
projection, ``(rows n d) -> (rows n e)``, with an optional offset.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange
from torch import Tensor

from mirai_plugin.collectives import gather_ints, gather_messages, world
from mirai_plugin.config import ForesightConfig
from mirai_plugin.errors import MiraiError
from mirai_plugin.loss import foresight_loss
from mirai_plugin.mean_target_cosine import mean_target_cosine
from mirai_plugin.segmented import SegmentGroup
from mirai_plugin.targets import SegmentLayout

Predict = Callable[..., Tensor]  # predict(rows, offset=None, *, checkpoint_blocks=False)


def group_losses(group: SegmentGroup, predict: Predict, config: ForesightConfig) -> Tensor:
    """Per-segment ``(r)`` or per-pair ``(r o)`` losses of one group."""
    b, r, n, _ = group.hidden.shape
    rows = rearrange(group.hidden, "b r n d -> (b r) n d")
    blocks = group.checkpoint_blocks
    if group.z is not None:  # offset-mean targets read from the encoder's segments
        assert group.source is not None
        pred = predict(rows, checkpoint_blocks=blocks).view(b, r, n, -1)  # (b r n e)
        return mean_target_cosine(pred, group.z, group.source, group.valid)  # (r)
    assert group.target is not None
    if config.fusion == "mean":
        pred = predict(rows, checkpoint_blocks=blocks).view(b, r, n, -1)  # (b r n e)
        return foresight_loss(pred, group.target, kind=config.loss, keep_dims=(1,))  # (r)
    if not (config.predictor == "multi_mlp" or config.offset_conditioning):
        pred = predict(rows, checkpoint_blocks=blocks).view(b, r, 1, n, -1)  # (b r 1 n e)
        return _pair_loss(pred, group.target, group.tokens_per_frame, config)  # (r o)

    columns = []  # one prediction per offset
    for o, offset in enumerate(config.offsets):
        valid = group.valid[:, o].to(group.hidden.device)
        column = torch.zeros(r, device=group.hidden.device)
        if bool(valid.any()):
            pred = predict(rearrange(group.hidden[:, valid], "b r n d -> (b r) n d"), offset, checkpoint_blocks=blocks)
            pred = pred.view(b, -1, 1, n, pred.shape[-1])  # (b r' 1 n e)
            losses = _pair_loss(pred, group.target[:, valid, o : o + 1], group.tokens_per_frame, config)[:, 0]  # (r')
            column = column.index_put((valid.nonzero()[:, 0],), losses)
        columns.append(column)
    return torch.stack(columns, dim=1)  # (r o)


def _pair_loss(pred: Tensor, target: Tensor, s: int, config: ForesightConfig) -> Tensor:
    """``(b r 1 n e)`` against ``(b r o n e)`` or ``(b r o s e)`` -> ``(r o)``."""
    if config.fusion == "frame_mean":
        pred = pred.unflatten(3, (-1, s))  # (b r 1 f s e)
        target = target.unsqueeze(3)  # (b r o 1 s e): one frame-averaged target for every frame
    return foresight_loss(pred, target, kind=config.loss, keep_dims=(1, 2))


def check_finite(loss: Tensor, hidden: list[Tensor], layout: SegmentLayout, per_item: Tensor) -> None:
    """Raise on NaN/inf, naming the segments; with several ranks every rank raises together
    (naming the rank), so none is left waiting in a collective."""
    problem = None if bool(torch.isfinite(loss)) else _diagnose(hidden, layout, per_item)
    _rank, world_size = world()
    if world_size == 1:
        if problem is not None:
            raise MiraiError(f"foresight loss is not finite: {problem}")
        return
    if not bool(gather_ints([problem is not None], loss.device).any()):
        return
    reports = [f"rank {r}: {m}" for r, m in enumerate(gather_messages(problem)) if m is not None]
    raise MiraiError(f"foresight loss is not finite on {len(reports)} of {world_size} ranks — " + "; ".join(reports))


def _diagnose(hidden: list[Tensor], layout: SegmentLayout, per_item: Tensor) -> str:
    segs = layout.segments.tolist()
    finite_z = torch.isfinite(layout.z).flatten(2).all(dim=2).all(dim=0)  # (K)
    bad_target = [segs[i] for i in range(len(segs)) if not bool(finite_z[layout.source[i][layout.valid[i]]].all())]
    bad_hidden = [segs[i] for i in range(len(segs)) if not bool(torch.isfinite(hidden[i]).all())]
    if bad_target:
        return f"encoder targets contain NaN/inf at segments {bad_target}"
    if bad_hidden:
        return f"captured generator hidden states contain NaN/inf at segments {bad_hidden}"
    return (
        f"the predictor output is NaN/inf (per-segment losses {per_item.detach().tolist()}); "
        f"lower lr, check max_grad_norm, or the head's dtype"
    )
