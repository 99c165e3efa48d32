"""The alignment loss: a pure function of the prediction and the target.

Legend: ... any leading dims (batch, segment, offset, token), e encoder width.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from mirai_plugin.checks import Rule, check, check_tensor, is_int
from mirai_plugin.config import LOSSES
from mirai_plugin.errors import MiraiError

# Same floor as torch.nn.functional.cosine_similarity.
_EPS = 1e-8


def foresight_loss(
    pred: Tensor,
    target: Tensor,
    *,
    kind: str = "cosine",
    keep_dims: Sequence[int] = (),
) -> Tensor:
    """Loss between predicted and target features, computed in float32.

    ``cosine`` is the official ``-mean(cos(pred, target))`` over tokens (the constant
    in ``1 - cos`` changes nothing in the gradients); ``mse`` is the mean squared
    error over tokens and channels. The target is a stop-gradient: it is detached
    here whatever the caller passes. A NaN or inf in the inputs gives a non-finite
    loss where it falls (no check here: it would sync the device every step; the
    heads' ``check_finite`` names it). Averaging over zero tokens is refused.

    Args:
        pred: ``(... e)`` predictions.
        target: ``(... e)``, broadcastable to ``pred``.
        kind: ``"cosine"`` or ``"mse"``.
        keep_dims: leading dims of ``pred`` not averaged over (e.g. segment and offset
            dims, for one loss per pair); by default the result is a scalar.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 7, 16)
        >>> round(foresight_loss(x, 3 * x).item(), 4)
        -1.0
        >>> foresight_loss(x, x, kind="mse").item()
        0.0
    """
    check_tensor("pred", pred)
    check_tensor("target", target)
    check("kind", kind, Rule("choice", choices=LOSSES))
    leading = pred.dim() - 1  # the width is always averaged over
    if isinstance(keep_dims, (str, bytes)) or not isinstance(keep_dims, Iterable) or not all(
        is_int(d) and -leading <= d < leading for d in keep_dims
    ):
        raise MiraiError(
            f"keep_dims must be leading dims of pred {tuple(pred.shape)} (ints in [{-leading}, {leading}), the width "
            f"excluded), got {keep_dims!r}"
        )
    if pred.shape[-1] != target.shape[-1]:
        raise MiraiError(
            f"prediction width {pred.shape[-1]} != target width {target.shape[-1]} "
            f"(shapes {tuple(pred.shape)} and {tuple(target.shape)}); the predictor must project to the encoder width"
        )
    try:
        shape = torch.broadcast_shapes(pred.shape, target.shape)
    except RuntimeError:
        raise MiraiError(
            f"target shape {tuple(target.shape)} does not broadcast to prediction shape {tuple(pred.shape)}"
        ) from None
    keep = {d % leading + len(shape) - pred.dim() for d in keep_dims}  # in the broadcast shape
    empty = [d for d in range(len(shape) - 1) if shape[d] == 0 and d not in keep]
    if empty or shape[-1] == 0:
        # The mean over nothing is NaN: an empty slice upstream, never a loss to train on.
        what = f"no tokens to average (dims {empty} have size 0)" if empty else "width 0"
        raise MiraiError(
            f"foresight_loss got {what}: pred {tuple(pred.shape)}, target {tuple(target.shape)}; check the slice "
            f"that built them (no captured segment, no target pair), or skip the term for this batch"
        )

    p = pred.float()
    y = target.detach().float()  # stop-gradient on the target
    if kind == "cosine":
        dot = (p * y).sum(-1)
        norms = (p * p).sum(-1) * (y * y).sum(-1)
        per_token = -dot * torch.rsqrt(norms.clamp_min(_EPS * _EPS))  # (...)
    else:
        per_token = (p - y).square().mean(-1)  # (...)

    reduce = [d for d in range(per_token.dim()) if d not in keep]
    return per_token.mean(dim=reduce) if reduce else per_token
