"""A synthetic video world: sprites with persistent identity bouncing on a static background.

Legend: v videos, f frames, c = 3 colour channels, h = w = size pixels, values in [0, 1].

Each video has its own background (a colour with a gradient) and a few sprites,
each with a fixed shape (square, disk or diamond) and colour, moving at constant
speed and bouncing off the borders. Given a few frames, the future is fully
determined: a generator that keeps identity, layout and motion can continue it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SHAPES = ("square", "disk", "diamond")


@dataclass(frozen=True)
class World:
    """Rendering settings; ``render`` is deterministic per seed."""

    size: int = 16
    sprites: int = 2
    radius: tuple[float, float] = (1.6, 2.6)
    speed: tuple[float, float] = (0.5, 1.1)

    def render(self, videos: int, frames: int, seed: int) -> tuple[Tensor, Tensor]:
        """``(video (v f c h w), background (v c h w))``, both in [0, 1]."""
        g = torch.Generator().manual_seed(seed)
        size = self.size
        coords = torch.arange(size, dtype=torch.float32)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (h w)

        base = 0.15 + 0.35 * torch.rand(videos, 3, 1, 1, generator=g)
        tilt = 0.25 * (torch.rand(videos, 3, 2, generator=g) - 0.5)
        ramp = (tilt[..., 0, None, None] * (xx / size - 0.5) + tilt[..., 1, None, None] * (yy / size - 0.5))
        background = (base + ramp).clamp(0, 1)  # (v c h w)

        video = background[:, None].repeat(1, frames, 1, 1, 1)  # (v f c h w)
        for _ in range(self.sprites):
            shape = torch.randint(len(SHAPES), (videos,), generator=g)
            radius = self.radius[0] + (self.radius[1] - self.radius[0]) * torch.rand(videos, generator=g)
            colour = _bright_colours(videos, g)  # (v c)
            pos = radius[:, None] + (size - 1 - 2 * radius[:, None]) * torch.rand(videos, 2, generator=g)
            angle = 2 * torch.pi * torch.rand(videos, generator=g)
            speed = self.speed[0] + (self.speed[1] - self.speed[0]) * torch.rand(videos, generator=g)
            vel = torch.stack([angle.cos(), angle.sin()], dim=1) * speed[:, None]  # (v 2) in px/frame
            low, high = radius[:, None], size - 1 - radius[:, None]
            for t in range(frames):
                alpha = _coverage(shape, radius, pos, xx, yy)  # (v h w)
                video[:, t] = video[:, t] * (1 - alpha[:, None]) + colour[:, :, None, None] * alpha[:, None]
                pos, vel = _bounce(pos + vel, vel, low, high)
        return video.clamp(0, 1), background


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
