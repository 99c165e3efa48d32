"""VBench's temporal consistency formulas on in-memory frames, for monitoring rollouts in training.

Legend: t frames, d feature width, h/w/c frame size.

* subject / background consistency: with unit-normalised per-frame features
  ``phi`` (VBench uses DINO for subjects, CLIP for backgrounds; pass any extractor's
  output), ``sum_{i>=1} (max(0, cos(phi_i, phi_{i-1})) + max(0, cos(phi_i, phi_0))) / 2``
  divided by ``t - 1``;
* temporal flickering: ``(255 - mean_i mean|f_i - f_{i+1}|) / 255`` on frames in [0, 255].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mirai_plugin.errors import MiraiError


def feature_consistency(features: Tensor) -> Tensor:
    """``(t d)`` or ``(v t d)`` per-frame features -> per-video score ``()`` or ``(v)``.

    >>> round(feature_consistency(torch.ones(5, 3)).item(), 6)
    1.0
    """
    if features.dim() not in (2, 3) or features.shape[-2] < 2:
        raise MiraiError(
            f"features must be (frames, width) or (videos, frames, width) with >= 2 frames, "
            f"got {tuple(features.shape)}"
        )
    phi = F.normalize(features.double(), dim=-1)
    to_previous = (phi[..., 1:, :] * phi[..., :-1, :]).sum(-1).clamp_min(0)
    to_first = (phi[..., 1:, :] * phi[..., :1, :]).sum(-1).clamp_min(0)
    return ((to_previous + to_first) / 2).mean(-1)


subject_consistency = feature_consistency
background_consistency = feature_consistency


def temporal_flickering(frames: Tensor) -> Tensor:
    """``(t h w c)`` or ``(v t h w c)`` frames in [0, 255] -> per-video score."""
    if frames.dim() not in (4, 5) or frames.shape[-4] < 2:
        raise MiraiError(
            f"frames must be (frames, h, w, c) or (videos, frames, h, w, c) with >= 2 frames, "
            f"got {tuple(frames.shape)}"
        )
    frames = frames.double()
    mae = (frames[..., 1:, :, :, :] - frames[..., :-1, :, :, :]).abs().mean(dim=(-3, -2, -1))  # (.. t-1)
    return (255.0 - mae.mean(-1)) / 255.0


def rollout_consistency(frames: Tensor, extractor: Callable[[Tensor], Tensor]) -> Tensor:
    """Consistency of ``(t ...)`` frames under any per-frame feature ``extractor`` (``(t ...) -> (t d)``)."""
    with torch.no_grad():
        return feature_consistency(extractor(frames))
