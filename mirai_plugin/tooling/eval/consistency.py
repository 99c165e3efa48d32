"""VBench's temporal consistency formulas on in-memory frames, for monitoring rollouts in training.

Legend: t frames, d feature width, h/w/c frame size.

* subject / background consistency: with unit-normalised per-frame features
  ``phi`` (VBench uses DINO for subjects, CLIP for backgrounds; pass any extractor's
  output), ``sum_{i>=1} (max(0, cos(phi_i, phi_{i-1})) + max(0, cos(phi_i, phi_0))) / 2``
  divided by ``t - 1``;
* temporal flickering: ``(255 - mean_i mean|f_i - f_{i+1}|) / 255`` on frames in [0, 255]
  (VBench's uint8 video frames; frames in [0, 1] are refused).

Non-finite features or frames are refused, naming the first such entry.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mirai_plugin.checks import check_finite_values
from mirai_plugin.errors import MiraiError


def feature_consistency(features: Tensor) -> Tensor:
    """``(t d)`` or ``(v t d)`` per-frame features -> per-video score ``()`` or ``(v)``.

    >>> round(feature_consistency(torch.ones(5, 3)).item(), 6)
    1.0
    """
    if not isinstance(features, Tensor) or features.dim() not in (2, 3) or features.shape[-2] < 2 \
            or features.shape[-1] < 1:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise MiraiError(
            f"features must be (frames, width) or (videos, frames, width) with >= 2 frames and width >= 1, "
            f"got {shape}"
        )
    check_finite_values("features", features, fix="a consistency score needs finite features")
    phi = F.normalize(features.double(), dim=-1)
    to_previous = (phi[..., 1:, :] * phi[..., :-1, :]).sum(-1).clamp_min(0)
    to_first = (phi[..., 1:, :] * phi[..., :1, :]).sum(-1).clamp_min(0)
    return ((to_previous + to_first) / 2).mean(-1)


subject_consistency = feature_consistency
background_consistency = feature_consistency


def temporal_flickering(frames: Tensor) -> Tensor:
    """``(t h w c)`` or ``(v t h w c)`` frames in [0, 255] -> per-video score.

    VBench reads the frames of an mp4 (uint8, 0-255) and scores
    ``(255 - mean MAE) / 255``. Frames scaled to [0, 1] would score about 1 whatever
    they show, so float frames whose values all lie in [0, 1] are refused (not all
    black: that scores 1 on either scale); uint8 frames are read as they are.

    >>> frames = torch.stack([torch.zeros(4, 4, 3), torch.full((4, 4, 3), 51.0)])
    >>> round(temporal_flickering(frames).item(), 6)
    0.8
    """
    if not isinstance(frames, Tensor) or frames.dim() not in (4, 5) or frames.shape[-4] < 2 \
            or 0 in frames.shape[-3:]:
        shape = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
        raise MiraiError(
            f"frames must be (frames, h, w, c) or (videos, frames, h, w, c) with >= 2 frames of at least one "
            f"pixel, got {shape}"
        )
    if frames.is_complex() or frames.dtype == torch.bool:
        raise MiraiError(f"frames must hold pixel values in [0, 255] (uint8, as VBench reads them), got {frames.dtype}")
    check_finite_values("frames", frames, fix="a consistency score needs finite frames (check the decode)")
    if frames.numel():
        low, high = frames.min().item(), frames.max().item()
        if low < 0 or high > 255:
            raise MiraiError(
                f"frames must hold pixel values in [0, 255] (VBench reads uint8 video frames), got values in "
                f"[{low:g}, {high:g}]; map [-1, 1] frames with (frames + 1) * 127.5"
            )
        if frames.is_floating_point() and 0 < high <= 1:
            raise MiraiError(
                f"frames hold values in [{low:g}, {high:g}]: frames scaled to [0, 1] would score about 1 whatever "
                f"they show; VBench's formula reads pixel values in [0, 255]: pass frames * 255 (or uint8 frames)"
            )
    frames = frames.double()
    mae = (frames[..., 1:, :, :, :] - frames[..., :-1, :, :, :]).abs().mean(dim=(-3, -2, -1))  # (.. t-1)
    return (255.0 - mae.mean(-1)) / 255.0


def rollout_consistency(frames: Tensor, extractor: Callable[[Tensor], Tensor]) -> Tensor:
    """Consistency of ``(t ...)`` frames under any per-frame feature ``extractor`` (``(t ...) -> (t d)``)."""
    with torch.no_grad():
        return feature_consistency(extractor(frames))
