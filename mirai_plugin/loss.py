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
    here whatever the caller passes.

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
    if isinstance(keep_dims, (str, bytes)) or not isinstance(keep_dims, Iterable) or not all(
        is_int(d) and -pred.dim() <= d < pred.dim() for d in keep_dims
    ):
        raise MiraiError(f"keep_dims must be dims of pred (ints in [{-pred.dim()}, {pred.dim()})), got {keep_dims!r}")
    if pred.shape[-1] != target.shape[-1]:
        raise MiraiError(
            f"prediction width {pred.shape[-1]} != target width {target.shape[-1]} "
            f"(shapes {tuple(pred.shape)} and {tuple(target.shape)}); the predictor must project to the encoder width"
        )
    try:
        torch.broadcast_shapes(pred.shape, target.shape)
    except RuntimeError:
        raise MiraiError(
            f"target shape {tuple(target.shape)} does not broadcast to prediction shape {tuple(pred.shape)}"
        ) from None

    p = pred.float()
    y = target.detach().float()  # stop-gradient on the target
    if kind == "cosine":
        dot = (p * y).sum(-1)
        norms = (p * p).sum(-1) * (y * y).sum(-1)
        per_token = -dot * torch.rsqrt(norms.clamp_min(_EPS * _EPS))  # (...)
    else:
        per_token = (p - y).square().mean(-1)  # (...)

    keep = {d % per_token.dim() for d in keep_dims}
    reduce = [d for d in range(per_token.dim()) if d not in keep]
    return per_token.mean(dim=reduce) if reduce else per_token
