"""The demo's registered settings: one JSON file per registration, and registration 2's pilot addendum.

``registrations/1.json`` is the first registration (its run stopped at the encoder gate);
``registrations/2.json`` the second, which leaves the run's size (generator steps,
evaluation videos, seeds) to a pilot on the positive control; ``registrations/2-pilot.json``
is the addendum that records what the pilot chose. Each file's sha256 is recorded in its
document under ``docs/`` and checked by a test: any change is a new, reported run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from mirai_plugin import ForesightConfig
from mirai_plugin.errors import MiraiError
from mirai_plugin.tooling.demo.pretrained import ModelSettings
from mirai_plugin.tooling.demo.world import OccludedWorld

REGISTRATIONS = Path(__file__).with_name("registrations")
CURRENT = 2
ARMS = ("baseline", "foresight", "control")


def registration_path(number: int) -> Path:
    return REGISTRATIONS / f"{number}.json"


def addendum_path(number: int) -> Path:
    return REGISTRATIONS / f"{number}-pilot.json"


@dataclass(frozen=True)
class GateSettings:
    videos: int  # held-out true clips (training length)
    test_videos: int  # of which the readouts are tested on
    probe_hidden: int  # readout MLP width (the same for features and pixels, and for the students' probe)
    probe_steps: int
    probe_lr: float
    probe_batch: int  # token rows per readout step
    margin_db: float  # features must beat pixels by this much on hidden -> reappearance
    seed: int


@dataclass(frozen=True)
class DMDSettings:
    generator_steps: int | None  # None: left to the pilot (registration 2)
    critic_per_generator: int  # Self-Forcing's dfake_gen_update_ratio
    batch: int
    generator_lr: float
    critic_lr: float
    betas: tuple[float, float]
    weight_decay: float
    max_grad_norm: float
    score_t_range: tuple[float, float]  # noise levels at which the scores are evaluated and trained
    denoising_steps: tuple[float, ...]  # the student's sampler
    fake_warmup_steps: int  # critic steps on the starting student's samples before any generator step


@dataclass(frozen=True)
class EvalSettings:
    rollout_frames: int
    eval_videos: int | None  # per seed; None: left to the pilot (registration 2)
    frames_per_event: int
    probe_videos: int
    probe_test_videos: int
    bootstrap_replicates: int
    bootstrap_level: float
    bootstrap_seed: int
    block: int = 0  # videos rendered per seed in blocks of this many, each its own seed (0: one render)


@dataclass(frozen=True)
class PilotSettings:
    """Registration 2's pilot: baseline and positive control only, on seeds the reported run never uses."""

    seeds: tuple[int, ...]
    arms: tuple[str, ...]
    generator_steps: tuple[int, ...]  # candidates, evaluated at checkpoints of one run per (seed, arm)
    eval_videos: tuple[int, ...]  # candidates: the first blocks of the largest
    seed_counts: tuple[int, ...]  # candidates for the reported run's seeds 0 .. S-1
    budget_seconds: float  # predicted wall time of the full run on `workers` cores, at most
    workers: int
    min_detecting_seeds: int  # pilot seeds on which the control's effect must be detected
    max_half_width_ratio: float  # the CI's half-width at most this fraction of |effect|


@dataclass(frozen=True)
class DemoConfig:
    models: ModelSettings
    gate: GateSettings
    dmd: DMDSettings
    foresight: dict
    arms: tuple[str, ...]
    seeds: tuple[int, ...] | None  # None: left to the pilot (registration 2)
    evaluation: EvalSettings
    primary_metric: str
    registration: int = 1
    pilot: PilotSettings | None = None
    deviations: tuple[str, ...] = field(default=())  # how this run differs from the registration

    @property
    def world(self) -> OccludedWorld:
        return self.models.world

    @property
    def segment_frames(self) -> int:
        return self.world.segment_frames

    @property
    def train_segments(self) -> int:
        return self.models.train_frames // self.segment_frames

    @property
    def sized(self) -> bool:
        """Whether the run's size is fixed (by the registration, its pilot addendum or options)."""
        return None not in (self.dmd.generator_steps, self.evaluation.eval_videos, self.seeds)

    def foresight_config(self) -> ForesightConfig:
        return ForesightConfig(**self.foresight, segment_frames=self.segment_frames, num_heads=self.models.heads)

    def to_dict(self) -> dict:
        return asdict(self)


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _settings(cls, data: dict):
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys in the registration: {sorted(unknown)}")
    return cls(**{k: _tuples(v) for k, v in data.items()})


def load_config(registration: int = CURRENT, *, addendum: bool = True) -> DemoConfig:
    """A registration's settings; for registration 2, with its pilot addendum's choices when it exists."""
    path = registration_path(registration)
    if not path.is_file():
        known = sorted(int(p.stem) for p in REGISTRATIONS.glob("[0-9].json"))
        raise MiraiError(f"no registration {registration} of the demo; registrations: {known}")
    data = json.loads(path.read_text())
    world = _settings(OccludedWorld, data["world"])
    cfg = DemoConfig(
        models=replace(_settings(ModelSettings, data["models"]), world=world),
        gate=_settings(GateSettings, data["gate"]),
        dmd=_settings(DMDSettings, data["dmd"]),
        foresight={k: _tuples(v) for k, v in data["foresight"].items()},
        arms=tuple(data["arms"]),
        seeds=tuple(data["seeds"]) if data["seeds"] is not None else None,
        evaluation=_settings(EvalSettings, data["evaluation"]),
        primary_metric=data["primary_metric"],
        registration=data.get("registration", 1),
        pilot=_settings(PilotSettings, data["pilot"]) if "pilot" in data else None,
    )
    check_models(cfg.models)
    if addendum and addendum_path(registration).is_file():
        cfg = with_size(cfg, **json.loads(addendum_path(registration).read_text())["chosen"])
    return cfg


def check_models(settings: ModelSettings) -> None:
    """Under the ``quality`` schedule every step cap leaves room for one check and its decay."""
    if settings.schedule != "quality":
        return
    least = (1 + settings.decay_fraction) * settings.check_every
    for name in ("teacher", "base", "student"):
        if settings.steps(name) < least:
            raise MiraiError(f"models.{name}_steps = {settings.steps(name)} is below one check and its decay "
                             f"({least:g} steps with check_every {settings.check_every}); raise it or lower "
                             "check_every")


def with_size(cfg: DemoConfig, *, generator_steps: int, eval_videos: int, seeds: list[int] | tuple[int, ...]
              ) -> DemoConfig:
    """``cfg`` with the run's size set (what the pilot addendum records)."""
    return replace(cfg, dmd=replace(cfg.dmd, generator_steps=generator_steps),
                   evaluation=replace(cfg.evaluation, eval_videos=eval_videos), seeds=tuple(seeds))


def require_sized(cfg: DemoConfig) -> None:
    if not cfg.sized:
        raise MiraiError(
            f"registration {cfg.registration} leaves the run's size to its pilot, and its addendum "
            f"{addendum_path(cfg.registration)} does not exist yet: run tools/demo_pilot.py (or give --steps and "
            "--seeds, a deviation)")


def quick(cfg: DemoConfig) -> DemoConfig:
    """Every stage at a tiny size (the CI smoke test); the models are trained for a few steps, so the
    gate is not expected to pass."""
    models = replace(cfg.models, teacher_steps=40, base_steps=40, student_steps=40, batch=8)
    if models.schedule == "quality":
        models = replace(models, warmup_steps=5, check_every=10, validation_videos=32, plateau_checks=1)
    return replace(
        cfg,
        models=models,
        gate=replace(cfg.gate, videos=96, test_videos=32, probe_steps=60, probe_batch=512),
        dmd=replace(cfg.dmd, generator_steps=3, fake_warmup_steps=5),
        seeds=(0, 1),
        evaluation=replace(cfg.evaluation, rollout_frames=24, eval_videos=16, block=min(cfg.evaluation.block, 8),
                           probe_videos=48, probe_test_videos=16, bootstrap_replicates=1000),
        deviations=(*cfg.deviations, "--quick: every stage at a tiny size"),
    )
