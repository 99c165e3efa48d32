"""The object's returns, and the primary metric read at them: the reappearance colour error.

Legend: v videos, f frames, K segments, c = 3 colour channels, h w pixels.

The models' quality criteria (``quality.py``) read the same metric as the demo's verdict,
so this module is part of the key of the trained models (``pretrained.models_key``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mirai_plugin.tooling.demo.world import Scene

HIDDEN_FRAMES = 3  # an event is a return after at least this many frames wholly off-screen (one segment)
BACK = 0.5  # the object counts as back once this fraction of it is visible


def hidden_pairs(scene: Scene, segment_frames: int) -> Tensor:
    """``(v K-1)`` bool: segment k shows nothing of the object and segment k+1 shows it again."""
    v, f = scene.visible.shape
    per_segment = scene.visible.view(v, f // segment_frames, segment_frames).amax(dim=2)  # (v K)
    return (per_segment[:, :-1] == 0) & (per_segment[:, 1:] >= 0.25)


def reappearance_frames(scene: Scene, first_frame: int, frames_per_event: int) -> Tensor:
    """``(v f)`` bool: the first ``frames_per_event`` frames at which the object is back (at least
    ``BACK`` of it visible) after at least ``HIDDEN_FRAMES`` frames wholly off-screen, from ``first_frame`` on."""
    visible = scene.visible.tolist()
    chosen = torch.zeros(scene.visible.shape, dtype=torch.bool)  # (v f)
    for video, fractions in enumerate(visible):
        hidden_run, remaining = 0, 0
        for t, fraction in enumerate(fractions):
            if fraction == 0:
                hidden_run, remaining = hidden_run + 1, 0
                continue
            if hidden_run >= HIDDEN_FRAMES:
                remaining = frames_per_event  # an event starts: the object is coming back
            hidden_run = 0
            if remaining and fraction >= BACK:
                chosen[video, t] = t >= first_frame
                remaining -= 1
    return chosen


def reappearance_colour_error(generated: Tensor, scene: Scene, frames: Tensor) -> Tensor:
    """Per video ``(v)``: RMS over RGB of (the mean generated colour over the object's interior pixels -
    the object's colour), averaged over the reappearance ``frames (v f)``; in [0, 1]."""
    interior = (scene.alpha >= 1.0).float()  # (v f h w): pixels the object covers wholly (its soft edge excluded)
    area = interior.sum(dim=(2, 3))  # (v f)
    mean_colour = (generated * interior[:, :, None]).sum(dim=(3, 4)) / area.clamp_min(1)[..., None]  # (v f c)
    error = (mean_colour - scene.colour[:, None]).square().mean(dim=2).sqrt()  # (v f)
    use = frames & (area > 0)
    return (error * use).sum(dim=1) / use.sum(dim=1).clamp_min(1)
