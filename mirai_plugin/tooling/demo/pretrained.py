"""The demo's starting point: the teacher, the fake score's initialisation and the teacher-forced student.

Legend: b batch, f frames, K segments, c h w pixels.

As in Self-Forcing, where the real score is Wan-14B, the fake score starts from the
pretrained Wan-1.3B and the student from a Stage-2 checkpoint of the same size, there are
three models: the **teacher** (bidirectional, the real score and the frozen foresight
encoder), the **base** (bidirectional at the student's width: the fake score's
initialisation) and the **student** (causal, teacher-forced denoising on true videos).
All are denoisers trained on the world's videos. ``tools/train_demo_models.py`` trains
them and writes the files shipped in ``mirai_plugin/tooling/demo/weights``. Files are used only
when their recorded key matches ``models_key(settings)``, a hash of the settings and of
the source of the code that produces them (this module, the world and the models);
otherwise the models are trained here and kept in a local cache under that key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from mirai_plugin.tooling.demo import models as models_module
from mirai_plugin.tooling.demo import world as world_module
from mirai_plugin.tooling.demo.models import Student, Teacher
from mirai_plugin.tooling.demo.progress import Progress
from mirai_plugin.tooling.demo.world import OccludedWorld

SHIPPED = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class ModelSettings:
    """Everything that determines the teacher and the pretrained student."""

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


def models_key(settings: ModelSettings) -> str:
    """Hash of the settings and of the code that trains the models (16 hex digits)."""
    digest = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode())
    for module in (world_module, models_module):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


def _cosine_lr(optimizer: torch.optim.Optimizer, base: float, step: int, total: int) -> None:
    warmup = max(1, total // 20)
    decay = max(1, total - warmup)
    scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / decay))
    for group in optimizer.param_groups:
        group["lr"] = base * scale


def train_bidirectional(settings: ModelSettings, which: str, progress: Progress) -> Teacher:
    """The teacher or the base: a flow-matching x0 denoiser over training clips whose first
    segment is always given clean (t = 0 on its frames, the loss on the others)."""
    offset = {"teacher": 0, "base": 30_000}[which]
    torch.manual_seed(settings.seed + offset + 10_000)
    model, steps, lr = (settings.teacher(), settings.teacher_steps, settings.teacher_lr) if which == "teacher" else (
        settings.base(), settings.base_steps, settings.base_lr)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(settings.seed + offset + 10_001)
    given = settings.segment_frames
    for step in progress.range(steps, f"{which} (bidirectional)"):
        _cosine_lr(optimizer, lr, step, steps)
        video = settings.world.render(settings.batch, settings.train_frames, seed=1_000_000 + step).video
        t = torch.rand(settings.batch, generator=g)
        levels = t[:, None].repeat(1, settings.train_frames)  # (b f)
        levels[:, :given] = 0.0
        level = levels[:, :, None, None, None]
        noisy = (1 - level) * video + level * torch.randn(video.shape, generator=g)
        loss = F.mse_loss(model(noisy, levels)[:, given:], video[:, given:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)


def pretrain_student(settings: ModelSettings, progress: Progress) -> Student:
    """Teacher-forced denoising (gradients through the clean context): the one starting point of
    every run, as a Stage-2 checkpoint is for Stage-3 DMD in the paper."""
    torch.manual_seed(settings.seed + 20_000)
    student = settings.student()
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.student_lr)
    g = torch.Generator().manual_seed(settings.seed + 20_001)
    n, segments = settings.segment_frames, settings.train_frames // settings.segment_frames
    for step in progress.range(settings.student_steps, "student (teacher forcing)"):
        _cosine_lr(optimizer, settings.student_lr, step, settings.student_steps)
        video = settings.world.render(settings.batch, settings.train_frames, seed=2_000_000 + step).video
        t = torch.rand(settings.batch, segments, generator=g)
        level = t.repeat_interleave(n, dim=1)[:, :, None, None, None]
        noisy = (1 - level) * video + level * torch.randn(video.shape, generator=g)
        loss = F.mse_loss(student.teacher_forcing(video, noisy, t)[:, n:], video[:, n:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return student.eval()


def _state(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


@dataclass
class Models:
    teacher: Teacher  # frozen: the real score and the foresight encoder
    base: Teacher  # the fake score's initialisation
    student: Student  # the teacher-forced starting checkpoint
    source: str = ""  # where they came from


NAMES = ("teacher", "base", "student")


def _train(settings: ModelSettings, name: str, progress: Progress | None = None) -> torch.nn.Module:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights whether the three run side by side or one after another
    try:
        progress = progress or Progress(enabled=False)
        if name == "student":
            return pretrain_student(settings, progress)
        return train_bidirectional(settings, name, progress)
    finally:
        torch.set_num_threads(threads)


def train_models(settings: ModelSettings, progress: Progress, *, workers: int = 1) -> Models:
    """Train the three models (independent of each other), ``workers`` at a time in worker processes."""
    if workers <= 1:
        trained = {name: _train(settings, name, progress) for name in NAMES}
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(NAMES)), mp_context=get_context("spawn")) as pool:
            futures = {name: pool.submit(_train, settings, name) for name in NAMES}
            trained = {}
            for name, future in futures.items():
                trained[name] = future.result()
                progress.note(f"{name}: trained")
    return Models(trained["teacher"], trained["base"], trained["student"], "trained")


def save_models(folder: Path, settings: ModelSettings, models: Models) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"key": models_key(settings), "settings": json.dumps(asdict(settings), sort_keys=True)}
    for name in NAMES:
        save_file(_state(getattr(models, name)), folder / f"{name}.safetensors", metadata=metadata)


def stored_key(folder: Path) -> str | None:
    """The key recorded in ``folder``'s files, or None when they are missing or disagree."""
    from safetensors import safe_open

    keys = set()
    for name in NAMES:
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as handle:
            keys.add((handle.metadata() or {}).get("key"))
    return keys.pop() if len(keys) == 1 else None


def load_models(folder: Path, settings: ModelSettings, source: str) -> Models:
    models = Models(settings.teacher(), settings.base(), settings.student(), source)
    for name in NAMES:
        getattr(models, name).load_state_dict(load_file(folder / f"{name}.safetensors"), strict=True)
    models.teacher.eval().requires_grad_(False)
    models.base.eval().requires_grad_(False)
    models.student.eval()
    return models


def cache_folder(settings: ModelSettings) -> Path:
    root = Path(os.environ.get("MIRAI_DEMO_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "mirai-plugin" / "demo")
    return root / models_key(settings)


def obtain_models(settings: ModelSettings, progress: Progress, *, workers: int | None = None) -> Models:
    """The shipped models when they match ``settings`` and this code, else the local cache, else train
    them, ``workers`` at a time (default: one per CPU), and fill the cache."""
    key = models_key(settings)
    if stored_key(SHIPPED) == key:
        return load_models(SHIPPED, settings, f"shipped with the package (key {key})")
    cached = cache_folder(settings)
    if stored_key(cached) == key:
        return load_models(cached, settings, f"local cache {cached}")
    models = train_models(settings, progress, workers=workers or os.cpu_count() or 1)
    save_models(cached, settings, models)
    models.source = f"trained now (key {key}), cached in {cached}"
    return models
