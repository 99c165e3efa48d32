"""The demo's starting point: the teacher, the fake score's initialisation and the teacher-forced student.

Legend: b batch, f frames, K segments, c h w pixels.

As in Self-Forcing, where the real score is Wan-14B, the fake score starts from the
pretrained Wan-1.3B and the student from a Stage-2 checkpoint of the same size, there are
three models: the **teacher** (bidirectional, the real score and the frozen foresight
encoder), the **base** (bidirectional at the student's width: the fake score's
initialisation) and the **student** (causal, teacher-forced denoising on true videos).
All are denoisers trained on the world's videos, with one of two schedules:

- ``fixed`` (registration 1): a fixed number of steps, 5% linear warm-up, cosine decay;
- ``quality`` (registration 2): linear warm-up, then a constant learning rate while the
  model is read on validation clips every ``check_every`` steps (``quality.py``); once it
  meets its criterion, or at the latest where the decay still fits under the step cap, a
  linear decay to zero over ``decay_fraction`` of the steps so far, then a final reading.

Under ``quality`` a run can keep a resume file (the model, the optimiser, the noise generator
and the schedule's state, every ``check_every`` steps); a run given the same file continues
where it stopped and ends with the same weights as one that never stopped.

``tools/train_demo_models.py`` trains them; ``store.py`` keeps them. A stored model is used only
when its recorded key matches ``models_key(settings)``, a hash of the settings and of the source
of the code that produces it (this module, the world, the models, the quality readings and the
metric they read), so nothing else belongs in this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mirai_plugin.errors import MiraiError
from mirai_plugin.tooling.demo import models as models_module
from mirai_plugin.tooling.demo import quality as quality_module
from mirai_plugin.tooling.demo import reappearance as reappearance_module
from mirai_plugin.tooling.demo import world as world_module
from mirai_plugin.tooling.demo.models import Student, Teacher
from mirai_plugin.tooling.demo.progress import Progress
from mirai_plugin.tooling.demo.quality import Criterion, Validation, draw_levels, read
from mirai_plugin.tooling.demo.world import OccludedWorld

NAMES = ("teacher", "student", "base")  # the longest first: the three train side by side, a core each


@dataclass(frozen=True)
class ModelSettings:
    """Everything that determines the teacher, the base and the pretrained student.

    The fields after ``seed`` came with registration 2; their defaults are registration 1's
    (a fixed number of steps, noise levels U(0, 1)). Under the ``quality`` schedule the
    ``*_steps`` are caps.
    """

    world: OccludedWorld = field(default_factory=OccludedWorld)
    train_frames: int = 12
    teacher_dim: int = 64
    teacher_depth: int = 4
    student_dim: int = 32
    student_depth: int = 4
    heads: int = 2
    teacher_steps: int = 3000
    teacher_lr: float = 1e-3
    base_steps: int = 3000
    base_lr: float = 1e-3
    student_steps: int = 3000
    student_lr: float = 1e-3
    batch: int = 32
    seed: int = 0
    schedule: str = "fixed"  # or "quality"
    warmup_steps: int = 0  # "quality": linear warm-up (registration 1's "fixed" warms up over 5% of the steps)
    decay_fraction: float = 0.0  # "quality": the decay lasts this fraction of the steps before it
    check_every: int = 0  # "quality": steps between readings on the validation clips
    validation_videos: int = 0
    plateau_checks: int = 0
    plateau_tolerance: float = 0.0
    teacher_quality: tuple[float, float] | None = None  # (max reappearance colour error in %, at noise level t)
    base_quality: tuple[float, float] | None = None
    student_quality: tuple[float, float] | None = None
    teacher_low_noise: tuple[float, float] = (0.0, 0.0)  # (share of clips, t upper bound): U(0, bound) for them

    def __post_init__(self) -> None:
        if self.schedule not in ("fixed", "quality"):
            raise MiraiError(f"models.schedule must be 'fixed' or 'quality', got {self.schedule!r}")
        if self.schedule == "quality" and min(self.check_every, self.validation_videos, self.warmup_steps,
                                              self.plateau_checks) < 1:
            raise MiraiError("the 'quality' schedule needs check_every, validation_videos, warmup_steps and "
                             "plateau_checks >= 1")

    @property
    def segment_frames(self) -> int:
        return self.world.segment_frames

    @property
    def window(self) -> int:
        return self.train_frames // self.segment_frames - 1  # at most the context seen in training

    def teacher(self) -> Teacher:
        return Teacher(self.teacher_dim, self.teacher_depth, self.heads, self.world.size, max_frames=self.train_frames)

    def base(self) -> Teacher:
        return Teacher(self.student_dim, self.student_depth, self.heads, self.world.size, max_frames=self.train_frames)

    def student(self) -> Student:
        return Student(self.student_dim, self.student_depth, self.heads, self.world.size, self.segment_frames,
                       self.window)

    def steps(self, name: str) -> int:
        return {"teacher": self.teacher_steps, "base": self.base_steps, "student": self.student_steps}[name]

    def lr(self, name: str) -> float:
        return {"teacher": self.teacher_lr, "base": self.base_lr, "student": self.student_lr}[name]

    def low_noise(self, name: str) -> tuple[float, float]:
        return self.teacher_low_noise if name == "teacher" else (0.0, 0.0)

    def criterion(self, name: str) -> Criterion:
        threshold = {"teacher": self.teacher_quality, "base": self.base_quality, "student": self.student_quality}[name]
        return Criterion(threshold[0] if threshold else None, threshold[1] if threshold else 0.0,
                         self.plateau_checks, self.plateau_tolerance)


def models_key(settings: ModelSettings) -> str:
    """Hash of the settings and of the code that trains the models (16 hex digits)."""
    digest = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode())
    for module in (world_module, models_module, reappearance_module, quality_module):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


def _cosine_lr(optimizer: torch.optim.Optimizer, base: float, step: int, total: int) -> None:
    warmup = max(1, total // 20)
    decay = max(1, total - warmup)
    scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / decay))
    _set_lr(optimizer, base * scale)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _save_resume(path: Path, state: dict) -> None:
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)  # a run stopped while saving keeps the previous file


def fit(settings: ModelSettings, name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
        step: Callable[[int], None], progress: Progress, rng: torch.Generator, resume: Path | None = None) -> dict:
    """Run ``step(i)`` (one optimiser step on training batch ``i``, drawing noise from ``rng``) under the
    settings' schedule; the training log. Under ``quality``, ``resume`` (a file) is continued from when it
    exists and was written for these settings and this code, and is kept up to date every ``check_every``
    steps; its ``seconds`` count the processor time of the training thread, summed over the runs."""
    cap, lr, began = settings.steps(name), settings.lr(name), time.perf_counter()
    label = f"{name} ({'teacher forcing' if name == 'student' else 'bidirectional'})"
    if settings.schedule == "fixed":
        for i in progress.range(cap, label):
            _cosine_lr(optimizer, lr, i, cap)
            step(i)
        return {"schedule": "fixed", "steps": cap, "seconds": time.perf_counter() - began}

    validation = Validation.render(settings.world, settings.validation_videos, settings.train_frames)
    criterion, every = settings.criterion(name), settings.check_every
    last_stable = int(cap / (1 + settings.decay_fraction)) // every * every  # the decay must end by the cap
    checks: list[dict] = []
    i, decay_from, decay_steps, stopped, spent = 0, -1, 0, "", 0.0
    key = models_key(settings)
    if resume is not None and resume.is_file():
        state = torch.load(resume, weights_only=False)
        if state["key"] != key:
            raise MiraiError(f"{resume} was written for other settings or code (key {state['key']}, now {key}): "
                             "delete it to train from the start")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        i, decay_from, decay_steps, stopped = state["i"], state["decay_from"], state["decay_steps"], state["stopped"]
        checks, spent = state["checks"], state["seconds"]
    clock = time.process_time() - spent
    bar = progress.bar(cap, label)
    bar.update(i)
    while decay_from < 0 or i < decay_from + decay_steps:
        if decay_from < 0:
            _set_lr(optimizer, lr * min(1.0, (i + 1) / settings.warmup_steps))
        else:
            _set_lr(optimizer, lr * (decay_from + decay_steps - i) / decay_steps)
        step(i)
        i += 1
        bar.update(i)
        if decay_from < 0 and i % every == 0:
            checks.append({"step": i, "seconds": time.process_time() - clock,
                           **read(model, validation, student=name == "student", low_noise=settings.low_noise(name))})
            bar.note(f"{name} step {i}: {_reading(checks[-1])}")
            if criterion.met(checks):
                stopped = f"criterion met at step {i}"
            elif i >= last_stable:
                stopped = f"step cap: the decay starts at step {i} without the criterion met"
            if stopped:
                decay_from, decay_steps = i, max(every, round(settings.decay_fraction * i))
        if resume is not None and i % every == 0:
            _save_resume(resume, {"key": key, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "rng": rng.get_state(), "torch_rng": torch.get_rng_state(), "i": i,
                                  "decay_from": decay_from, "decay_steps": decay_steps, "stopped": stopped,
                                  "checks": checks, "seconds": time.process_time() - clock})
    bar.close()
    final = read(model, validation, student=name == "student", low_noise=settings.low_noise(name))
    bar.note(f"{name} final ({i} steps): {_reading(final)}")
    return {"schedule": "quality", "criterion": criterion.describe(), "stopped": stopped, "decay_from": decay_from,
            "steps": i, "checks": checks, "final": final, "seconds": time.process_time() - clock}


def _reading(reading: dict) -> str:
    errors = ", ".join(f"t={t} {e:.1f}%" for t, e in reading["colour_error"].items())
    return f"validation loss {reading['loss']:.5f}, reappearance colour error {errors}"


def train_bidirectional(settings: ModelSettings, which: str, progress: Progress,
                        resume: Path | None = None) -> tuple[Teacher, dict]:
    """The teacher or the base: a flow-matching x0 denoiser over training clips whose first
    segment is always given clean (t = 0 on its frames, the loss on the others)."""
    offset = {"teacher": 0, "base": 30_000}[which]
    torch.manual_seed(settings.seed + offset + 10_000)
    model = settings.teacher() if which == "teacher" else settings.base()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr(which))
    g = torch.Generator().manual_seed(settings.seed + offset + 10_001)
    given, low_noise = settings.segment_frames, settings.low_noise(which)

    def step(i: int) -> None:
        video = settings.world.render(settings.batch, settings.train_frames, seed=1_000_000 + i).video
        levels = draw_levels(settings.batch, g, low_noise)[:, None].repeat(1, settings.train_frames)  # (b f)
        levels[:, :given] = 0.0
        level = levels[:, :, None, None, None]
        noisy = (1 - level) * video + level * torch.randn(video.shape, generator=g)
        loss = F.mse_loss(model(noisy, levels)[:, given:], video[:, given:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    log = fit(settings, which, model, optimizer, step, progress, g, resume)
    return model.eval().requires_grad_(False), log


def pretrain_student(settings: ModelSettings, progress: Progress, resume: Path | None = None) -> tuple[Student, dict]:
    """Teacher-forced denoising (gradients through the clean context): the one starting point of
    every run, as a Stage-2 checkpoint is for Stage-3 DMD in the paper."""
    torch.manual_seed(settings.seed + 20_000)
    student = settings.student()
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.student_lr)
    g = torch.Generator().manual_seed(settings.seed + 20_001)
    n, segments = settings.segment_frames, settings.train_frames // settings.segment_frames

    def step(i: int) -> None:
        video = settings.world.render(settings.batch, settings.train_frames, seed=2_000_000 + i).video
        t = torch.rand(settings.batch, segments, generator=g)  # (b K)
        level = t.repeat_interleave(n, dim=1)[:, :, None, None, None]
        noisy = (1 - level) * video + level * torch.randn(video.shape, generator=g)
        loss = F.mse_loss(student.teacher_forcing(video, noisy, t)[:, n:], video[:, n:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    log = fit(settings, "student", student, optimizer, step, progress, g, resume)
    return student.eval(), log


def state_copy(module: torch.nn.Module) -> dict[str, Tensor]:
    """A detached, contiguous copy of ``module``'s state (to save, or to pass to worker processes)."""
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


@dataclass
class Models:
    teacher: Teacher  # frozen: the real score and the foresight encoder
    base: Teacher  # the fake score's initialisation
    student: Student  # the teacher-forced starting checkpoint
    source: str = ""  # where they came from
    training: dict = field(default_factory=dict)  # each model's training log, by name


def _train(settings: ModelSettings, name: str, verbose: bool = False,
           resume: Path | None = None) -> tuple[nn.Module, dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights whether the three run side by side or one after another
    try:
        progress = Progress(enabled=False, notes=verbose)
        if name == "student":
            return pretrain_student(settings, progress, resume)
        return train_bidirectional(settings, name, progress, resume)
    finally:
        torch.set_num_threads(threads)


def train_models(settings: ModelSettings, progress: Progress, *, workers: int = 1,
                 resume_folder: Path | None = None) -> Models:
    """Train the three models (independent of each other), ``workers`` at a time in worker processes;
    with ``resume_folder``, each keeps its resume file there (``<name>.resume.pt``) and continues from it."""
    if resume_folder is not None:
        resume_folder.mkdir(parents=True, exist_ok=True)
    resume = {name: resume_folder / f"{name}.resume.pt" if resume_folder else None for name in NAMES}
    if workers <= 1:
        trained = {name: _train(settings, name, progress.enabled, resume[name]) for name in NAMES}
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(NAMES)), mp_context=get_context("spawn")) as pool:
            futures = {name: pool.submit(_train, settings, name, progress.enabled, resume[name]) for name in NAMES}
            trained = {}
            for name, future in futures.items():
                trained[name] = future.result()
                progress.note(f"{name}: trained")
    models = Models(**{name: trained[name][0] for name in NAMES}, source="trained")
    models.training = {name: trained[name][1] for name in NAMES}
    return models
