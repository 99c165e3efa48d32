"""The demo's measurements beside the primary metric: the encoder gate, probes, PSNR, consistency.

Legend: v videos, f frames, K segments, n = segment_frames, s tokens per frame,
t = n*s tokens per segment, p = 48 pixel values per token, e encoder width, d student width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mirai_plugin import FrozenEncoder, capture_hidden, fuse_targets
from mirai_plugin.tooling.demo.dmd import encode_context
from mirai_plugin.tooling.demo.models import Student, Teacher, patchify
from mirai_plugin.tooling.demo.progress import Progress
from mirai_plugin.tooling.demo.reappearance import hidden_pairs
from mirai_plugin.tooling.demo.world import Scene
from mirai_plugin.tooling.probe import fit_readout


def segment_pixels(video: Tensor, segment_frames: int) -> Tensor:
    """``(v f c h w)`` -> token-aligned pixels of every segment ``(v K t p)``."""
    v, f = video.shape[:2]
    return patchify(video).view(v, f // segment_frames, -1, patchify(video[:1, :1]).shape[-1])


def readout_psnr(features: Tensor, targets: Tensor, train: Tensor, *, hidden: int, steps: int, lr: float,
                 batch: int, seed: int) -> float:
    """PSNR of a token-wise MLP readout ``features (m t d) -> targets (m t p)`` trained on rows
    ``train`` (bool over m), tested on the rest. Pixel values are in [0, 1]."""
    x_train, y_train = features[train].flatten(0, 1), targets[train].flatten(0, 1)
    readout = fit_readout(x_train.float(), y_train.float(), hidden=hidden, steps=steps, lr=lr, batch=batch, seed=seed)
    with torch.no_grad():
        prediction = readout(features[~train].flatten(0, 1).float())
    mse = (prediction - targets[~train].flatten(0, 1)).square().mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def encoder_gate(teacher: Teacher, scene: Scene, *, layer: int, offsets: tuple[int, ...], segment_frames: int,
                 test_videos: int, hidden: int, steps: int, lr: float, batch: int, seed: int,
                 progress: Progress | None = None) -> dict:
    """The gate: what the head is given (``FrozenEncoder(teacher, layer)`` at t = 0, fused over ``offsets``)
    against the pixels of the same segment, as inputs of equal-capacity readouts of segment k+1.

    ``hidden``: k wholly hidden, k+1 the reappearance; ``all``: every k with a k+1. PSNR in dB.
    """
    video = scene.video
    v, f = video.shape[:2]
    encoder = FrozenEncoder(teacher, layer)
    z = torch.cat([encoder(chunk, torch.zeros(chunk.shape[0])) for chunk in video.split(64)])  # (v f*s e)
    fused = fuse_targets(z, segment_frames=segment_frames, tokens_per_frame=teacher.tokens_per_frame,
                         offsets=offsets).target  # (v K t e)
    pixels = segment_pixels(video, segment_frames)  # (v K t p)
    test = torch.arange(v) >= v - test_videos  # held-out videos
    pairs = {
        "hidden": hidden_pairs(scene, segment_frames),
        "all": torch.ones(v, f // segment_frames - 1, dtype=torch.bool),
    }
    result = {}
    bar = (progress or Progress(enabled=False)).bar(2 * len(pairs), "encoder gate (readouts)")
    for i, (name, mask) in enumerate(pairs.items()):
        rows = mask.nonzero()  # (m 2): video, segment k
        train = ~test[rows[:, 0]]
        target = pixels[rows[:, 0], rows[:, 1] + 1]  # (m t p): segment k+1
        options = {"hidden": hidden, "steps": steps, "lr": lr, "batch": batch, "seed": seed}
        result[name] = {
            "features": readout_psnr(fused[rows[:, 0], rows[:, 1]], target, train, **options),
            "pixels": readout_psnr(pixels[rows[:, 0], rows[:, 1]], target, train, **options),
            "pairs": int(rows.shape[0]),
            "test_pairs": int((~train).sum()),
        }
        result[name]["margin"] = result[name]["features"] - result[name]["pixels"]
        bar.update(2 * (i + 1))
    bar.close()
    return result


# ------------------------------------------------------------------ students


def student_features(student: Student, video: Tensor, layer: int) -> Tensor:
    """``(v K t d)``: layer ``layer``'s output while the student denoises each segment at t = 0.5,
    with the true earlier segments in its cache (what it holds while producing segment k)."""
    n, window = student.segment_frames, student.window
    segments = video.shape[1] // n
    g = torch.Generator().manual_seed(123)
    half = torch.full((video.shape[0],), 0.5)
    truth = [video[:, k * n : (k + 1) * n] for k in range(segments)]
    blank = torch.zeros_like(video[:, 0])
    features = []
    with torch.no_grad():
        for k in range(segments):
            first = max(0, k - window)
            before = truth[first - 1][:, -1] if first > 0 else blank
            cache = encode_context(student, truth[first:k], before, first)
            noisy = 0.5 * truth[k] + 0.5 * torch.randn(truth[k].shape, generator=g)
            previous = truth[k - 1][:, -1] if k > 0 else blank
            with capture_hidden(student, layer, grad_only=False) as captured:
                student(noisy, half, cache, k - first, previous=previous, position=k)
            features.append(captured[0].hidden)
    return torch.stack(features, dim=1)


def student_probe(student: Student, scene: Scene, *, layer: int, test_videos: int, hidden: int, steps: int,
                  lr: float, batch: int, seed: int) -> float:
    """PSNR of a readout from the student's state in a wholly hidden segment to the reappearance segment."""
    n = student.segment_frames
    features = student_features(student, scene.video, layer)  # (v K t d)
    pixels = segment_pixels(scene.video, n)
    rows = hidden_pairs(scene, n).nonzero()
    train = rows[:, 0] < scene.video.shape[0] - test_videos
    return readout_psnr(features[rows[:, 0], rows[:, 1]], pixels[rows[:, 0], rows[:, 1] + 1], train,
                        hidden=hidden, steps=steps, lr=lr, batch=batch, seed=seed)


def consistency(video: Tensor, background: Tensor, shown: Tensor) -> dict[str, Tensor]:
    """Per-video subject and background consistency ``(v)``, VBench's formula
    ``mean_t (cos(phi_t, phi_first) + cos(phi_t, phi_previous)) / 2`` over the frames after the first.

    Subject: over the frames where the true object is at least half visible (``shown (v f)``; it
    leaves the frame between them), ``phi`` is a 64-bin colour histogram of the generated frame's
    subject pixels (those more than 0.1 away from the true background); a frame that shows no
    subject scores 0. Background: over every frame, ``phi`` is the 4x4-pooled frame, centred.
    """
    v, f = video.shape[:2]
    foreground = ((video - background[:, None]).abs().amax(dim=2) > 0.1).float()  # (v f h w)
    bins = (video.clamp(0, 0.999) * 4).long()  # 4 levels per channel
    index = bins[:, :, 0] * 16 + bins[:, :, 1] * 4 + bins[:, :, 2]  # (v f h w)
    subject = torch.zeros(v, f, 64).scatter_add_(2, index.flatten(2), foreground.flatten(2))  # (v f 64)
    scene = F.avg_pool2d(video.flatten(0, 1), 4).view(v, f, -1) - 0.5  # (v f 16*3)
    scores = {"subject": torch.zeros(v), "background": _vbench_consistency(scene)}
    for i in range(v):
        scores["subject"][i] = _vbench_consistency(subject[i : i + 1, shown[i]])[0]
    return scores


def _vbench_consistency(phi: Tensor) -> Tensor:
    """``(v f k)`` features -> ``(v)``; 1 for fewer than two frames."""
    if phi.shape[1] < 2:
        return torch.ones(phi.shape[0])
    phi = F.normalize(phi, dim=-1)
    to_first = (phi[:, 1:] * phi[:, :1]).sum(-1)
    to_previous = (phi[:, 1:] * phi[:, :-1]).sum(-1)
    return ((to_first + to_previous) / 2).mean(dim=1)


def psnr_per_video(a: Tensor, b: Tensor) -> Tensor:
    """``(v)`` PSNR in dB of ``a`` against ``b``, both ``(v ...)`` in [0, 1]."""
    mse = (a - b).square().flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))
