"""Self-Forcing's DMD on the toy: the student's own rollouts, a real score, a fake score trained online.

Legend: b batch, f frames, c h w pixels, n = segment_frames, K segments.

The student rolls out segment by segment from the given first segment, feeding its
own outputs back through its KV cache, with one grad-enabled denoising call per
segment (the exit step, drawn at random per rollout; Self-Forcing's
``same_step_across_blocks``). The generator loss is Self-Forcing's distribution
matching loss (``model/dmd.py``: ``_compute_kl_grad`` and
``compute_distribution_matching_loss``):

    x_t    = (1 - t) x + t noise                  one t per video, all generated frames
    grad   = (p_fake(x_t) - p_real(x_t)) / mean |x - p_real(x_t)|     per-video normaliser
    loss   = 0.5 * mse(x, (x - grad).detach())

with the frozen teacher as the real score and a fake score (started from a copy of the
teacher) trained online, on critic steps, to denoise the student's samples. The given
first segment is clean (t = 0) in both scores' input, as an image-conditioned model's
conditioning frame, and outside the loss (Self-Forcing's ``gradient_mask``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mirai_plugin.tooling.demo.models import Student, Teacher

DENOISING_STEPS = (1.0, 0.5)  # the student's few-step sampler (noise levels of its calls)


def encode_context(student: Student, segments: list[Tensor], before: Tensor, first_position: int) -> list[list]:
    """A KV cache holding ``segments`` at slots 0.. (context passes at t = 0, no gradients)."""
    cache, zero = student.new_cache(), torch.zeros(before.shape[0])
    with torch.no_grad():
        for j, segment in enumerate(segments):
            student(segment, zero, cache, j, previous=before, position=first_position + j, write=True)
            before = segment[:, -1]
    return cache


def rollout(student: Student, first: Tensor, segments: int, *, exit_index: int, g: torch.Generator,
            levels: tuple[float, ...] = DENOISING_STEPS) -> Tensor:
    """Generate ``segments`` segments after ``first`` (given): ``(b f c h w)`` with ``first`` included.

    Per segment: few-step denoising from noise at the noise ``levels``, the call at ``exit_index`` with gradients
    (the others without), then a context pass on the output that fills the KV cache. Past
    the training horizon the cache is re-encoded over the last ``window`` segments, so the
    positions are always those seen in training.
    """
    b, window = first.shape[0], student.window
    out = [first]
    cache = encode_context(student, [first], torch.zeros_like(first[:, 0]), 0)
    for k in range(1, segments + 1):
        if k > window:
            cache = encode_context(student, out[-window:], out[-window - 1][:, -1], k - window)
        slot, previous = min(k, window), out[-1][:, -1]
        x = torch.randn(first.shape, generator=g)
        for i, level in enumerate(levels):
            t = torch.full((b,), level)
            if i == exit_index:
                x0 = student(x, t, cache, slot, previous=previous, position=k)  # the call that keeps gradients
                break
            with torch.no_grad():
                x0 = student(x, t, cache, slot, previous=previous, position=k)
                following = levels[i + 1]
                x = (1 - following) * x0 + following * torch.randn(x0.shape, generator=g)
        out.append(x0)
        if k < window:
            with torch.no_grad():  # context pass on the output
                student(x0.detach(), torch.zeros(b), cache, slot, previous=previous, position=k, write=True)
    return torch.cat(out, dim=1)


def noised(video: Tensor, given_frames: int, t_range: tuple[float, float], g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(x_t (b f c h w), t per frame (b f))``: one level per video on the generated frames, the given ones clean."""
    b, frames = video.shape[:2]
    t = t_range[0] + (t_range[1] - t_range[0]) * torch.rand(b, generator=g)  # (b)
    levels = t[:, None].expand(b, frames).clone()
    levels[:, :given_frames] = 0.0
    level = levels[:, :, None, None, None]
    return (1 - level) * video + level * torch.randn(video.shape, generator=g), levels


def dmd_loss(video: Tensor, real: Teacher, fake: Teacher, *, given_frames: int, t_range: tuple[float, float],
             g: torch.Generator) -> Tensor:
    """Self-Forcing's distribution matching loss on ``video (b f c h w)`` (see the module docstring)."""
    generated = video[:, given_frames:]  # (b f' c h w), attached to the student's graph
    with torch.no_grad():
        noisy, levels = noised(video.detach(), given_frames, t_range, g)
        p_real = real(noisy, levels)[:, given_frames:]
        p_fake = fake(noisy, levels)[:, given_frames:]
        normaliser = (generated - p_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)  # (b 1 1 1 1)
        grad = torch.nan_to_num((p_fake - p_real) / normaliser)
    x = generated.double()
    return 0.5 * F.mse_loss(x, (x - grad.double()).detach()).float()


def critic_loss(fake: Teacher, video: Tensor, *, given_frames: int, t_range: tuple[float, float],
                g: torch.Generator) -> Tensor:
    """The fake score's denoising loss on the student's (detached) samples: x0 MSE on the generated frames,
    the loss the teacher was trained with."""
    noisy, levels = noised(video, given_frames, t_range, g)
    return F.mse_loss(fake(noisy, levels)[:, given_frames:], video[:, given_frames:])
