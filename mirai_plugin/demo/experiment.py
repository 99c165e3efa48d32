"""The demo experiment: a teacher, two students (baseline and + foresight), and their evaluation.

Legend: b batch, f frames, n = segment_frames, K segments, s tokens per frame, d width.

The student is a causal few-step generator trained Self-Forcing style: it rolls
out segment by segment from the first (given) segment, feeding its own outputs
back through its KV cache, with one grad-enabled denoising call per segment (a
random exit step), and regresses each generated segment on the world's true
continuation (the world is deterministic given the first segment). The
foresight run adds exactly the three lines of the README's integration.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from mirai_plugin import ForesightConfig, ForesightHead, FrozenEncoder, capture_hidden
from mirai_plugin.demo.models import Student, Teacher, patchify
from mirai_plugin.demo.progress import Progress
from mirai_plugin.demo.world import World
from mirai_plugin.probe import probe

DENOISING_STEPS = (1.0, 0.5)  # two-step sampler, as the few-step students of Self-Forcing


@dataclass
class DemoConfig:
    steps: int = 250
    pretrain_steps: int = 1000
    teacher_steps: int = 400
    seeds: tuple[int, ...] = (0, 1, 2)
    segment_frames: int = 3
    train_frames: int = 12
    rollout_frames: int = 48
    offsets: tuple[int, ...] = (0, 1)
    layer: int = 1
    encoder_layer: int | None = None  # default: the same relative depth as `layer`
    depth: int = 4
    dim: int = 64
    heads: int = 4
    batch: int = 16
    lr: float = 1e-3
    pretrain_lr: float = 2e-3
    weight: float = 0.2
    probe_videos: int = 192
    eval_videos: int = 64
    probe_steps: int = 300
    size: int = 16
    timing_repeats: int = 5

    @property
    def train_segments(self) -> int:
        return self.train_frames // self.segment_frames

    @property
    def window(self) -> int:
        return self.train_segments - 1  # at most the context seen in training

    @property
    def teacher_layer(self) -> int:
        return self.encoder_layer if self.encoder_layer is not None else self.layer

    def foresight(self) -> ForesightConfig:
        # Recipe settings throughout; the head's learning rate follows the student's (the
        # official trainer falls back to the generator's lr when lr_foresight is unset).
        return ForesightConfig(
            weight=self.weight, student_layer=self.layer, encoder_layer=self.teacher_layer, offsets=self.offsets,
            segment_frames=self.segment_frames, num_heads=self.heads, lr=self.lr, replay=False,
        )


QUICK = dict(steps=50, pretrain_steps=120, teacher_steps=100, seeds=(0, 1), probe_videos=96, eval_videos=24, probe_steps=150,
             rollout_frames=24, timing_repeats=2)


# ------------------------------------------------------------------ teacher


def train_teacher(cfg: DemoConfig, world: World, progress: Progress) -> Teacher:
    torch.manual_seed(10_000)
    teacher = Teacher(cfg.dim, cfg.depth, cfg.heads, cfg.size, max_frames=cfg.train_frames)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(10_001)
    for step in progress.range(cfg.teacher_steps, "teacher (bidirectional)"):
        video, _ = world.render(cfg.batch, cfg.train_frames, seed=1_000_000 + step)
        t = torch.rand(cfg.batch, generator=g)
        noisy = (1 - t[:, None, None, None, None]) * video + t[:, None, None, None, None] * torch.randn(
            video.shape, generator=g
        )
        loss = F.mse_loss(teacher(noisy, t), video)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return teacher.eval().requires_grad_(False)


# ----------------------------------------------------------------- students


def encode_context(student: Student, segments: list[Tensor], before: Tensor, first_position: int) -> list[list]:
    """A KV cache holding ``segments`` at slots 0.. (context passes at t = 0, no gradients)."""
    cache, zero = student.new_cache(), torch.zeros(before.shape[0])
    with torch.no_grad():
        for j, segment in enumerate(segments):
            student(segment, zero, cache, j, previous=before, position=first_position + j, write=True)
            before = segment[:, -1]
    return cache


def rollout(student: Student, first: Tensor, segments: int, *, exit_index: int, g: torch.Generator) -> Tensor:
    """Generate ``segments`` segments after ``first`` (given): ``(b f c h w)`` with ``first`` included.

    Per segment: few-step denoising from noise, the call at ``exit_index`` with gradients
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
        for i, level in enumerate(DENOISING_STEPS):
            t = torch.full((b,), level)
            if i == exit_index:
                x0 = student(x, t, cache, slot, previous=previous, position=k)  # the call that keeps gradients
                break
            with torch.no_grad():
                x0 = student(x, t, cache, slot, previous=previous, position=k)
                nxt = DENOISING_STEPS[i + 1]
                x = (1 - nxt) * x0 + nxt * torch.randn(x0.shape, generator=g)
        out.append(x0)
        if k < window:
            with torch.no_grad():  # context pass on the output
                student(x0.detach(), torch.zeros(b), cache, slot, previous=previous, position=k, write=True)
    return torch.cat(out, dim=1)


def pretrain_student(cfg: DemoConfig, world: World, progress: Progress) -> dict[str, Tensor]:
    """Teacher-forced denoising pretraining (gradients through the clean context): the one
    starting point of every run, as a Stage-2 checkpoint is for Stage-3 DMD in the paper."""
    torch.manual_seed(20_000)
    student = Student(cfg.dim, cfg.depth, cfg.heads, cfg.size, cfg.segment_frames, cfg.window)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.pretrain_lr)
    g = torch.Generator().manual_seed(20_001)
    n, segments = cfg.segment_frames, cfg.train_segments
    for step in progress.range(cfg.pretrain_steps, "student pretraining (teacher forcing)"):
        video, _ = world.render(cfg.batch, cfg.train_frames, seed=2_000_000 + step)
        t = torch.rand(cfg.batch, segments, generator=g)
        level = t.repeat_interleave(n, dim=1)[:, :, None, None, None]
        noisy = (1 - level) * video + level * torch.randn(video.shape, generator=g)
        loss = F.mse_loss(student.teacher_forcing(video, noisy, t)[:, n:], video[:, n:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {k: v.clone() for k, v in student.state_dict().items()}


@dataclass
class TrainedStudent:
    student: Student
    step_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    foresight_losses: list[float] = field(default_factory=list)


def train_student(cfg: DemoConfig, world: World, teacher: Teacher, seed: int, init: dict[str, Tensor], *,
                  foresight: bool, progress: Progress) -> TrainedStudent:
    student = Student(cfg.dim, cfg.depth, cfg.heads, cfg.size, cfg.segment_frames, cfg.window)
    student.load_state_dict(init)  # the same pretrained start for both runs of a seed
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr)
    if foresight:
        fcfg = cfg.foresight()
        head = ForesightHead(fcfg, student_dim=cfg.dim, encoder_dim=cfg.dim)
        encoder = FrozenEncoder(teacher, fcfg.encoder_layer)
    g = torch.Generator().manual_seed(seed + 7)  # same noise, exit steps and data for both runs
    n, trained = cfg.segment_frames, TrainedStudent(student)
    label = f"student seed {seed} " + ("+ foresight" if foresight else "baseline")
    for step in progress.range(cfg.steps, label):
        start = time.perf_counter()
        video, _ = world.render(cfg.batch, cfg.train_frames, seed=seed * 1_000_000 + step)
        exit_index = int(torch.randint(len(DENOISING_STEPS), (1,), generator=g))
        if foresight:
            with capture_hidden(student, fcfg.student_layer) as captured:  # mirai: 1/3
                generated = rollout(student, video[:, :n], cfg.train_segments - 1, exit_index=exit_index, g=g)
        else:
            generated = rollout(student, video[:, :n], cfg.train_segments - 1, exit_index=exit_index, g=g)
        loss = F.mse_loss(generated[:, n:], video[:, n:])
        total = loss
        if foresight:
            term = head(captured, encoder(generated.detach(), torch.zeros(cfg.batch)))  # mirai: 2/3
            total = loss + term
            trained.foresight_losses.append(term.item())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if foresight:
            head.step()  # mirai: 3/3
        trained.step_seconds.append(time.perf_counter() - start)
        trained.losses.append(loss.item())
    student.eval().requires_grad_(False)
    return trained


# --------------------------------------------------------------- evaluation


def probe_features(student: Student, videos: Tensor, layers: list[int]) -> dict[int, Tensor]:
    """Teacher-forced features of every segment: ``{layer: (v K n*s d)}``.

    Segment k is denoised at t = 0.5 with the true earlier segments in the cache (the
    probe reads what the generator holds while producing segment k).
    """
    n, window = student.segment_frames, student.window
    segments = videos.shape[1] // n
    g = torch.Generator().manual_seed(123)
    half = torch.full((videos.shape[0],), 0.5)
    truth = [videos[:, k * n : (k + 1) * n] for k in range(segments)]
    blank = torch.zeros_like(videos[:, 0])
    features: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    with torch.no_grad():
        for k in range(segments):
            first = max(0, k - window)
            before = truth[first - 1][:, -1] if first > 0 else blank
            cache = encode_context(student, truth[first:k], before, first)
            noisy = 0.5 * truth[k] + 0.5 * torch.randn(truth[k].shape, generator=g)
            previous = truth[k - 1][:, -1] if k > 0 else blank
            with contextlib.ExitStack() as stack:
                records = [stack.enter_context(capture_hidden(student, layer, grad_only=False)) for layer in layers]
                student(noisy, half, cache, k - first, previous=previous, position=k)
            for layer, captured in zip(layers, records):
                features[layer].append(captured[0].hidden)
    return {layer: torch.stack(parts, dim=1) for layer, parts in features.items()}


def consistency(video: Tensor, background: Tensor) -> dict[str, Tensor]:
    """Per-video subject and background consistency of every frame prefix: ``(v f)`` each.

    VBench's formula, ``mean_t (cos(phi_t, phi_0) + cos(phi_t, phi_{t-1})) / 2``, with
    ``phi`` a 64-bin colour histogram of the subject pixels (those that differ from
    the video's true background) for subject consistency, and the 4x4-pooled frame,
    centred, for background consistency. See docs/demo.md.
    """
    v, f = video.shape[:2]
    foreground = ((video - background[:, None]).abs().amax(dim=2) > 0.1).float()  # (v f h w)
    bins = (video.clamp(0, 0.999) * 4).long()  # 4 levels per channel
    index = bins[:, :, 0] * 16 + bins[:, :, 1] * 4 + bins[:, :, 2]  # (v f h w)
    subject = torch.zeros(v, f, 64).scatter_add_(2, index.flatten(2), foreground.flatten(2))
    scene = F.avg_pool2d(video.flatten(0, 1), 4).view(v, f, -1) - 0.5
    scores = {}
    for name, phi in (("subject", subject), ("background", scene)):
        phi = F.normalize(phi, dim=-1)
        to_first = (phi[:, 1:] * phi[:, :1]).sum(-1)
        to_previous = (phi[:, 1:] * phi[:, :-1]).sum(-1)
        per_frame = (to_first + to_previous) / 2  # (v f-1)
        scores[name] = per_frame.cumsum(dim=1) / torch.arange(1, f, dtype=per_frame.dtype)  # prefix means
    return scores


def psnr(a: Tensor, b: Tensor) -> float:
    return 10 * math.log10(1.0 / max(F.mse_loss(a, b).item(), 1e-12))


def evaluate(cfg: DemoConfig, world: World, trained: TrainedStudent, seed: int, probe_layers: list[int]) -> dict:
    student = trained.student
    n = cfg.segment_frames
    horizons = (1, 2, 3)
    probe_segments = cfg.train_segments + max(horizons)
    videos, _ = world.render(cfg.probe_videos, probe_segments * n, seed=50_000_000 + seed)
    targets = patchify(videos).view(cfg.probe_videos, probe_segments, -1, 48)  # (v K n*s p)
    features = probe_features(student, videos, probe_layers)
    probe_result = {
        layer: probe(feats, targets, horizons=horizons, steps=cfg.probe_steps, seed=seed)
        for layer, feats in features.items()
    }

    first_frames = cfg.rollout_frames
    eval_video, background = world.render(cfg.eval_videos, first_frames, seed=60_000_000 + seed)
    segments = first_frames // n - 1
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        generated = rollout(student, eval_video[:, :n], segments, exit_index=len(DENOISING_STEPS) - 1, g=g)
    scores = consistency(generated, background)
    truth = consistency(eval_video, background)
    lengths = list(range(cfg.train_segments, segments + 2, cfg.train_segments))  # in segments
    per_segment_psnr = [psnr(generated[:, k * n : (k + 1) * n], eval_video[:, k * n : (k + 1) * n])
                        for k in range(1, segments + 1)]
    return {
        "probe": {str(layer): {str(h): r for h, r in res.items()} for layer, res in probe_result.items()},
        "consistency": {
            name: {str(m * n): scores[name][:, m * n - 2].mean().item() for m in lengths} for name in scores
        },
        "consistency_ground_truth": {
            name: {str(m * n): truth[name][:, m * n - 2].mean().item() for m in lengths} for name in truth
        },
        "rollout_psnr": per_segment_psnr,
        "train_step_seconds": _median(trained.step_seconds[min(5, len(trained.step_seconds) - 1):]),
        "inference_segment_seconds": inference_seconds(cfg, student, eval_video[:, :n]),
        "final_loss": sum(trained.losses[-20:]) / len(trained.losses[-20:]),
        "final_foresight_loss": (sum(trained.foresight_losses[-20:]) / len(trained.foresight_losses[-20:])
                                 if trained.foresight_losses else None),
    }


def inference_seconds(cfg: DemoConfig, student: Student, first: Tensor) -> float:
    segments = cfg.rollout_frames // cfg.segment_frames - 1
    times = []
    for repeat in range(cfg.timing_repeats):
        g = torch.Generator().manual_seed(repeat)
        start = time.perf_counter()
        with torch.no_grad():
            rollout(student, first, segments, exit_index=len(DENOISING_STEPS) - 1, g=g)
        times.append((time.perf_counter() - start) / segments)
    return _median(times)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def config_dict(cfg: DemoConfig) -> dict:
    d = asdict(cfg)
    d["encoder_layer"] = cfg.teacher_layer
    return d
