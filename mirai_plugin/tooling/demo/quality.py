"""How good a trained model is, read on validation clips, and the criterion that ends its training.

Legend: v videos, f frames, K segments, c h w pixels.

Every model is read at fixed intervals on the same validation clips (their own seed: disjoint
from the training clips, the encoder gate's clips and the evaluation videos) and never on
anything else:

- its **denoising loss**: the loss it is trained with (x0 MSE on the frames after the given
  segment), with the noise levels drawn as in its training and the noise fixed per clip;
- the **reappearance colour error** of its x0 prediction at the noise levels ``READ_AT``
  (the primary metric's reading, on the frames where the object comes back after a wholly
  hidden segment, over the clips that have such a return; in %). The bidirectional models
  see the given segment clean and every other frame at that level; the student is
  teacher-forced, every segment at that level with the true earlier segments as context.

A model meets its criterion when its colour error at the criterion's noise level is at most the
threshold (where one is set) and its loss no longer improves: less than ``tolerance`` (relative)
below its value ``plateau_checks`` checks earlier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mirai_plugin.tooling.demo.reappearance import reappearance_colour_error, reappearance_frames
from mirai_plugin.tooling.demo.world import OccludedWorld, Scene

VALIDATION_SEED = 85_000_000
READ_AT = (0.25, 0.5, 1.0)  # noise levels at which the colour error is read
CHUNK = 64  # clips per forward pass


@dataclass(frozen=True)
class Validation:
    """The validation clips and where their object comes back."""

    scene: Scene
    frames: Tensor  # (v f) bool: reappearance frames after the given segment
    returns: Tensor  # (v) bool: clips with at least one such frame
    segment_frames: int

    @classmethod
    def render(cls, world: OccludedWorld, videos: int, frames: int) -> Validation:
        scene = world.render(videos, frames, seed=VALIDATION_SEED)
        chosen = reappearance_frames(scene, world.segment_frames, 3)
        return cls(scene, chosen, chosen.any(dim=1), world.segment_frames)


def draw_levels(batch: int, generator: torch.Generator, low_noise: tuple[float, float] = (0.0, 0.0)) -> Tensor:
    """One noise level per clip ``(b)``: U(0, 1), or with probability ``low_noise[0]`` U(0, ``low_noise[1]``).

    With no low-noise share it draws exactly what a plain ``torch.rand`` draws (registration 1's sampling).
    """
    t = torch.rand(batch, generator=generator)
    fraction, highest = low_noise
    if fraction > 0:
        near = torch.rand(batch, generator=generator) < fraction
        t = torch.where(near, highest * t, t)  # highest * U(0, 1) is U(0, highest), independent of `near`
    return t


def _bidirectional_levels(t: Tensor, frames: int, given: int) -> Tensor:
    levels = t[:, None].repeat(1, frames)  # (b f)
    levels[:, :given] = 0.0  # the given segment is clean
    return levels


def _noised(video: Tensor, levels: Tensor, noise: Tensor) -> Tensor:
    level = levels[:, :, None, None, None]  # (b f 1 1 1)
    return (1 - level) * video + level * noise


def _predict(model: nn.Module, student: bool, clean: Tensor, levels: Tensor, noise: Tensor, n: int) -> Tensor:
    """x0 ``(b f c h w)``; ``levels`` per frame ``(b f)`` (constant over each segment for the student)."""
    noisy = _noised(clean, levels, noise)
    if student:
        return model.teacher_forcing(clean, noisy, levels[:, ::n])
    return model(noisy, levels)


@torch.no_grad()
def read(model: nn.Module, validation: Validation, *, student: bool,
         low_noise: tuple[float, float] = (0.0, 0.0)) -> dict:
    """``{"loss": float, "colour_error": {"0.25": %, ...}}`` of ``model`` on ``validation``."""
    was_training = model.training
    model.eval()
    scene, n = validation.scene, validation.segment_frames
    video = scene.video
    v, frames = video.shape[:2]
    g = torch.Generator().manual_seed(VALIDATION_SEED + 1)  # the same levels and noise at every check
    if student:
        t = torch.rand(v, frames // n, generator=g).repeat_interleave(n, dim=1)  # (v f): one level per segment
    else:
        t = _bidirectional_levels(draw_levels(v, g, low_noise), frames, n)  # (v f)
    noise = torch.randn(video.shape, generator=g)
    squared = 0.0
    for chunk in range(0, v, CHUNK):
        part = slice(chunk, chunk + CHUNK)
        x0 = _predict(model, student, video[part], t[part], noise[part], n)
        squared += F.mse_loss(x0[:, n:], video[part, n:], reduction="sum").item()
    loss = squared / video[:, n:].numel()
    errors = {}
    for level in READ_AT:
        levels = torch.full((v, frames), level)
        if not student:
            levels[:, :n] = 0.0
        x0 = torch.cat([_predict(model, student, video[c : c + CHUNK], levels[c : c + CHUNK],
                                 noise[c : c + CHUNK], n) for c in range(0, v, CHUNK)])
        error = 100 * reappearance_colour_error(x0, scene, validation.frames)  # (v)
        errors[f"{level:g}"] = error[validation.returns].mean().item()
    model.train(was_training)
    return {"loss": loss, "colour_error": errors}


@dataclass(frozen=True)
class Criterion:
    """When a model is good enough: colour error at noise level ``at`` at most ``max_colour_error`` (% ; None: no
    threshold) and the validation loss less than ``tolerance`` below its value ``plateau_checks`` checks earlier."""

    max_colour_error: float | None
    at: float
    plateau_checks: int
    tolerance: float

    def met(self, history: list[dict]) -> bool:
        last = history[-1]
        if self.max_colour_error is not None and last["colour_error"][f"{self.at:g}"] > self.max_colour_error:
            return False
        if len(history) <= self.plateau_checks:
            return False
        return last["loss"] > (1 - self.tolerance) * history[-1 - self.plateau_checks]["loss"]

    def describe(self) -> str:
        plateau = (f"validation loss less than {100 * self.tolerance:g}% below its value {self.plateau_checks} "
                   "checks earlier")
        if self.max_colour_error is None:
            return plateau
        return f"reappearance colour error at t = {self.at:g} at most {self.max_colour_error:g}% and {plateau}"
