"""A synthetic video world with a long-range dependency: an object that leaves the frame and comes back.

Legend: v videos, f frames, c = 3 colour channels, h = w = size pixels, values in [0, 1].

Each video has its own background (a colour with a gradient) and one object whose
identity (shape: square, disk or diamond; colour: a bright hue) is drawn per video.
The object moves horizontally at constant speed along a closed track longer than the
frame: it crosses the frame, goes off-screen for a fixed ``gap`` of track (at the
default speeds 4.4 to 5.5 frames, longer than a 3-frame segment), then re-enters from
the opposite side where its motion puts it (its height keeps following its vertical
bounces), with the same identity; this repeats over the rollout. The first
segment shows the object (all of it but, at most, part of its one-pixel soft edge), so
the future is determined by it; but while the object is away no frame shows it: a causal
generator must carry its identity through the hidden segments, while a bidirectional
encoder sees the reappearance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SHAPES = ("square", "disk", "diamond")


@dataclass(frozen=True)
class Scene:
    """What ``OccludedWorld.render`` drew, for the metrics.

    ``alpha (v f h w)`` is how much of each pixel the object covers (its soft mask),
    ``colour (v c)`` and ``shape (v)`` its identity, ``background (v c h w)`` the static scene.
    """

    video: Tensor  # (v f c h w)
    background: Tensor  # (v c h w)
    alpha: Tensor  # (v f h w)
    colour: Tensor  # (v c)
    shape: Tensor  # (v)

    @classmethod
    def concatenate(cls, scenes: list[Scene]) -> Scene:
        """The videos of ``scenes``, one after another."""
        return cls(*(torch.cat([getattr(s, name) for s in scenes]) for name in
                     ("video", "background", "alpha", "colour", "shape")))

    @property
    def visible(self) -> Tensor:
        """Visible fraction of the object per frame ``(v f)``: 0 while it is off-screen."""
        area = self.alpha.sum(dim=(2, 3))
        return area / area.amax(dim=1, keepdim=True).clamp_min(1e-6)


@dataclass(frozen=True)
class OccludedWorld:
    """Rendering settings (the demo's "world difficulty"); ``render`` is deterministic per seed.

    Args:
        size: frame side in pixels.
        radius: object radius range (pixels).
        speed: horizontal speed range (pixels per frame); the direction is drawn per video.
        vertical_speed: vertical speed range (pixels per frame); the object bounces off top and bottom.
        gap: off-screen track length (pixels): the object is wholly hidden for ``gap / speed`` frames.
        exit_margin: how far (pixels) inside the frame border the object's far edge is at the
            last frame of the first segment; it then leaves within a few frames.
        segment_frames: frames of the first segment, which shows the object.
    """

    size: int = 16
    radius: tuple[float, float] = (1.8, 2.4)
    speed: tuple[float, float] = (2.0, 2.5)
    vertical_speed: tuple[float, float] = (-0.5, 0.5)
    gap: float = 11.0
    exit_margin: tuple[float, float] = (0.0, 1.0)
    segment_frames: int = 3

    def render(self, videos: int, frames: int, seed: int) -> Scene:
        g = torch.Generator().manual_seed(seed)
        size = self.size
        coords = torch.arange(size, dtype=torch.float32)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (h w)

        base = 0.15 + 0.35 * torch.rand(videos, 3, 1, 1, generator=g)
        tilt = 0.25 * (torch.rand(videos, 3, 2, generator=g) - 0.5)
        ramp = tilt[..., 0, None, None] * (xx / size - 0.5) + tilt[..., 1, None, None] * (yy / size - 0.5)
        background = (base + ramp).clamp(0, 1)  # (v c h w)

        shape = torch.randint(len(SHAPES), (videos,), generator=g)
        radius = _uniform(videos, self.radius, g)
        colour = _bright_colours(videos, g)  # (v c)
        speed = _uniform(videos, self.speed, g)
        direction = torch.where(torch.rand(videos, generator=g) < 0.5, -1.0, 1.0)
        vertical = _uniform(videos, self.vertical_speed, g)
        margin = _uniform(videos, self.exit_margin, g)
        y = radius + (size - 1 - 2 * radius) * torch.rand(videos, generator=g)

        # Track coordinate u along the direction of motion: the object is visible while
        # u < span (its far edge has entered and its near edge not yet left), off-screen
        # for `gap` pixels of track after that. At the first segment's last frame the far
        # edge is `margin` inside the border.
        span = size + 2 * radius + 1
        track = span + self.gap
        last = self.segment_frames - 1
        u = size - margin - speed * last  # the far edge is at size - 1 - margin at frame `last`

        video = background[:, None].repeat(1, frames, 1, 1, 1)  # (v f c h w)
        alpha = torch.zeros(videos, frames, size, size)
        low, high = radius, size - 1 - radius
        for t in range(frames):
            along = torch.remainder(u + speed * t, track) - radius - 1  # centre, in the direction of motion
            x = torch.where(direction > 0, along, size - 1 - along)
            alpha[:, t] = _coverage(shape, radius, torch.stack([x, y], dim=1), xx, yy)
            video[:, t] = video[:, t] * (1 - alpha[:, t, None]) + colour[:, :, None, None] * alpha[:, t, None]
            y, vertical = _bounce(y + vertical, vertical, low, high)
        return Scene(video.clamp(0, 1), background, alpha, colour, shape)


def _uniform(n: int, bounds: tuple[float, float], g: torch.Generator) -> Tensor:
    return bounds[0] + (bounds[1] - bounds[0]) * torch.rand(n, generator=g)


def _bright_colours(n: int, g: torch.Generator) -> Tensor:
    hue = torch.rand(n, generator=g)
    k = (torch.tensor([5.0, 3.0, 1.0]) + hue[:, None] * 6) % 6
    rgb = 1 - (torch.minimum(k, 4 - k).clamp(0, 1))  # saturated hue wheel
    return 0.35 + 0.65 * rgb


def _coverage(shape: Tensor, radius: Tensor, pos: Tensor, xx: Tensor, yy: Tensor) -> Tensor:
    dx = xx[None] - pos[:, 0, None, None]
    dy = yy[None] - pos[:, 1, None, None]
    distance = torch.where(
        (shape == 0)[:, None, None],
        torch.maximum(dx.abs(), dy.abs()),
        torch.where((shape == 1)[:, None, None], (dx * dx + dy * dy).sqrt(), (dx.abs() + dy.abs()) / 1.4),
    )
    return (radius[:, None, None] + 0.5 - distance).clamp(0, 1)  # soft edge, one pixel wide


def _bounce(pos: Tensor, vel: Tensor, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    below, above = pos < low, pos > high
    pos = torch.where(below, 2 * low - pos, torch.where(above, 2 * high - pos, pos))
    vel = torch.where(below | above, -vel, vel)
    return pos, vel
