"""The demo experiment: the DMD fine-tuning of each arm, and the evaluation of a student.

Legend: b batch, f frames, n = segment_frames, K segments, c h w pixels.

Arms, all fine-tuned from the same teacher-forced student with the same data, noise and
exit steps per seed:

- ``baseline``: Self-Forcing DMD (``dmd.py``), 5 critic steps per generator step;
- ``foresight``: the same plus exactly the README's lines (``capture_hidden``, the head on
  ``FrozenEncoder(teacher)`` of the rollout, ``head.step()``) and ``head.replay()`` on the
  critic steps that are not generator steps;
- ``control`` (positive control): as ``foresight``, but the encoder sees the ground-truth
  video instead of the rollout, so the target carries the true future.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from torch import Tensor

from mirai_plugin import ForesightHead, FrozenEncoder, capture_hidden
from mirai_plugin.tooling.demo.dmd import critic_loss, dmd_loss, rollout
from mirai_plugin.tooling.demo.evaluation import consistency, psnr_per_video, student_probe
from mirai_plugin.tooling.demo.models import Student, Teacher
from mirai_plugin.tooling.demo.pretrained import state_copy
from mirai_plugin.tooling.demo.progress import Progress
from mirai_plugin.tooling.demo.reappearance import reappearance_colour_error, reappearance_frames
from mirai_plugin.tooling.demo.registration import DemoConfig
from mirai_plugin.tooling.demo.world import Scene

# ------------------------------------------------------------------ training


def warm_up_fake(cfg: DemoConfig, base: Teacher, student: Student, progress: Progress | None = None
                 ) -> dict[str, Tensor]:
    """The fake score's starting state: the base trained ``fake_warmup_steps`` critic steps on the starting
    student's samples (shared by every arm and seed, like the student it starts from)."""
    fake = _copy(base, cfg.models.base()).train().requires_grad_(True)
    d = cfg.dmd
    optimizer = torch.optim.AdamW(fake.parameters(), lr=d.critic_lr, betas=d.betas, weight_decay=d.weight_decay)
    g = torch.Generator().manual_seed(40_000)
    for step in (progress or Progress(enabled=False)).range(d.fake_warmup_steps, "fake score warm-up"):
        first = cfg.world.render(d.batch, cfg.segment_frames, seed=4_000_000 + step).video
        _critic_step(cfg, fake, optimizer, student, first, g)
    return state_copy(fake)


def _critic_step(cfg: DemoConfig, fake: Teacher, optimizer: torch.optim.Optimizer, student: Student, first: Tensor,
                 g: torch.Generator) -> float:
    d = cfg.dmd
    exit_index = int(torch.randint(len(d.denoising_steps), (1,), generator=g))
    with torch.no_grad():
        sample = rollout(student, first, cfg.train_segments - 1, exit_index=exit_index, g=g, levels=d.denoising_steps)
    loss = critic_loss(fake, sample, given_frames=cfg.segment_frames, t_range=d.score_t_range, g=g)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(fake.parameters(), d.max_grad_norm)
    optimizer.step()
    return loss.item()


def gradient_ratio(student: Student, dmd: Tensor, term: Tensor) -> dict[str, float]:
    """|grad of the weighted foresight term| / |grad of the DMD loss| on the student's parameters, and
    the two gradients' cosine (logged at the first generator step, never used to change a setting)."""
    params = [p for p in student.parameters() if p.requires_grad]
    if not term.requires_grad:  # the term is off (weight 0): nothing reaches the student
        return {"ratio": 0.0, "cosine": 0.0, "dmd_norm": float("nan"), "term_norm": 0.0}
    flat = []
    for loss in (dmd, term):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        flat.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)]))
    norm_dmd, norm_term = flat[0].norm().item(), flat[1].norm().item()
    return {"ratio": norm_term / max(norm_dmd, 1e-30), "cosine": torch.nn.functional.cosine_similarity(
        flat[0], flat[1], dim=0).item(), "dmd_norm": norm_dmd, "term_norm": norm_term}


def train_arm(cfg: DemoConfig, teacher: Teacher, fake: Teacher, student: Student, seed: int, arm: str, *,
              checkpoints: Collection[int] = (), at_checkpoint: Callable[[Student, int], None] | None = None,
              on_cycle: Callable[[], None] | None = None) -> dict:
    """DMD fine-tuning of ``student`` (in place) for one arm; returns the training log.

    ``at_checkpoint(student, cycles)`` is called after each of the ``checkpoints`` (numbers of completed DMD
    cycles): the student there is the one a run of that many generator steps ends with (the learning rates are
    constant and the checkpoint's work draws nothing from the training's random streams); its time is left out
    of the cycle times. ``on_cycle()`` is called after every cycle (progress).
    """
    d, n = cfg.dmd, cfg.segment_frames
    student.train().requires_grad_(True)
    fake.train().requires_grad_(True)
    generator_optimizer = torch.optim.AdamW(student.parameters(), lr=d.generator_lr, betas=d.betas,
                                            weight_decay=d.weight_decay)
    critic_optimizer = torch.optim.AdamW(fake.parameters(), lr=d.critic_lr, betas=d.betas, weight_decay=d.weight_decay)
    foresight = arm != "baseline"
    if foresight:
        torch.manual_seed(seed)  # the head's initialisation
        fcfg = cfg.foresight_config()
        head = ForesightHead(fcfg, student_dim=student.dim, encoder_dim=teacher.dim)
        encoder = FrozenEncoder(teacher, fcfg.encoder_layer)
    g = torch.Generator().manual_seed(1_000 + seed)  # data, noise and exit steps: the same in every arm
    log: dict = {"dmd_loss": [], "foresight_term": [], "critic_loss": [], "cycle_seconds": [], "gradient": None}
    critic_losses: list[float] = []
    start = time.perf_counter()
    for step in range(d.generator_steps * d.critic_per_generator):
        generator_step = step % d.critic_per_generator == 0
        if generator_step:
            if step:
                log["cycle_seconds"].append(time.perf_counter() - start)
                log["critic_loss"].append(sum(critic_losses) / len(critic_losses))
                start, critic_losses = time.perf_counter(), []
            video = cfg.world.render(
                d.batch, cfg.models.train_frames, seed=seed * 1_000_000 + step
            ).video  # (b f c h w)
            exit_index = int(torch.randint(len(d.denoising_steps), (1,), generator=g))
            capture = capture_hidden(student, fcfg.student_layer) if foresight else contextlib.nullcontext()
            with capture as captured:  # 1
                generated = rollout(student, video[:, :n], cfg.train_segments - 1, exit_index=exit_index, g=g,
                                    levels=d.denoising_steps)
            loss = dmd_loss(generated, teacher, fake, given_frames=n, t_range=d.score_t_range, g=g)
            total = loss
            if foresight:
                seen = video if arm == "control" else generated  # the positive control's encoder sees the truth
                term = head(captured, encoder(seen.detach(), torch.zeros(d.batch)))  # 2
                if step == 0:
                    log["gradient"] = gradient_ratio(student, loss, term)
                total = loss + term
                log["foresight_term"].append(term.item())
            generator_optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), d.max_grad_norm)
            generator_optimizer.step()
            if foresight:
                head.step()  # 3
            log["dmd_loss"].append(loss.item())
        first = cfg.world.render(d.batch, n, seed=seed * 1_000_000 + 500_000 + step).video
        critic_losses.append(_critic_step(cfg, fake, critic_optimizer, student, first, g))
        if foresight and not generator_step:
            head.replay()  # the predictor alone, on the last generator step's pairs (projector_every_step)
        cycles = (step + 1) // d.critic_per_generator
        if on_cycle is not None and (step + 1) % d.critic_per_generator == 0:
            on_cycle()
        if at_checkpoint is not None and (step + 1) % d.critic_per_generator == 0 and cycles in checkpoints:
            paused = time.perf_counter()
            at_checkpoint(student, cycles)
            start += time.perf_counter() - paused
    log["cycle_seconds"].append(time.perf_counter() - start)
    log["critic_loss"].append(sum(critic_losses) / len(critic_losses))
    student.eval().requires_grad_(False)
    return log


# ---------------------------------------------------------------- evaluation


def evaluation_rollouts(cfg: DemoConfig, student: Student, seed: int) -> tuple[Scene, Tensor]:
    """The seed's evaluation videos and the student's rollouts from their true first segments ``(v f c h w)``.

    In blocks (``evaluation.block``), each block its own videos and sampling noise, so the first blocks of a
    larger evaluation are exactly a smaller one; the same videos and noise for every arm of a seed.
    """
    e, n, levels = cfg.evaluation, cfg.segment_frames, cfg.dmd.denoising_steps
    if not e.block:  # registration 1: one render, one noise stream
        blocks = [(e.eval_videos, 60_000_000 + seed, 90_000 + seed)]
    else:
        blocks = [(e.block, 60_000_000 + 1000 * seed + b, 90_000_000 + 1000 * seed + b)
                  for b in range(e.eval_videos // e.block)]
    scenes, generated = [], []
    for videos, scene_seed, noise_seed in blocks:
        scene = cfg.world.render(videos, e.rollout_frames, seed=scene_seed)
        g = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            generated.append(rollout(student, scene.video[:, :n], e.rollout_frames // n - 1,
                                     exit_index=len(levels) - 1, g=g, levels=levels))  # (v f c h w)
        scenes.append(scene)
    return Scene.concatenate(scenes), torch.cat(generated)


def primary_metric(cfg: DemoConfig, scene: Scene, generated: Tensor) -> Tensor:
    """The reappearance colour error per video ``(v)``, in % of the pixel range."""
    frames = reappearance_frames(scene, cfg.segment_frames, cfg.evaluation.frames_per_event)
    return 100 * reappearance_colour_error(generated, scene, frames)


def evaluate_student(cfg: DemoConfig, student: Student, seed: int, *, primary_only: bool = False) -> dict:
    """Every metric of one student (or the primary one alone); per-video values are paired across arms by position."""
    e, n = cfg.evaluation, cfg.segment_frames
    scene, generated = evaluation_rollouts(cfg, student, seed)
    identity = primary_metric(cfg, scene, generated)  # (v)
    if primary_only:
        return {"identity_error": identity.tolist()}
    beyond = cfg.models.train_frames
    shown = scene.visible[:, beyond:] >= 0.5
    scores = consistency(generated[:, beyond:], scene.background, shown)
    truth = consistency(scene.video[:, beyond:], scene.background, shown)
    probe_scene = cfg.world.render(e.probe_videos, cfg.models.train_frames, seed=70_000_000)
    g_ = cfg.gate
    probe_psnr = student_probe(student, probe_scene, layer=cfg.foresight_config().student_layer,
                               test_videos=e.probe_test_videos, hidden=g_.probe_hidden, steps=g_.probe_steps,
                               lr=g_.probe_lr, batch=g_.probe_batch, seed=g_.seed)
    segments = e.rollout_frames // n
    return {
        "identity_error": identity.tolist(),
        "psnr_beyond_horizon": psnr_per_video(generated[:, beyond:], scene.video[:, beyond:]).tolist(),
        "psnr_per_segment": [psnr_per_video(generated[:, k * n : (k + 1) * n], scene.video[:, k * n : (k + 1) * n])
                             .mean().item() for k in range(1, segments)],
        "subject_consistency": scores["subject"].tolist(),
        "background_consistency": scores["background"].tolist(),
        "subject_consistency_truth": truth["subject"].mean().item(),
        "background_consistency_truth": truth["background"].mean().item(),
        "probe_psnr": probe_psnr,
    }


# ---------------------------------------------------------------- one task


def _copy(source: torch.nn.Module, target: torch.nn.Module) -> torch.nn.Module:
    target.load_state_dict(source.state_dict())
    return target


@dataclass
class Start:
    """The shared starting point every task rebuilds its models from (picklable for worker processes)."""

    teacher: dict[str, Tensor]
    fake: dict[str, Tensor]
    student: dict[str, Tensor]


def rebuild(cfg: DemoConfig, start: Start) -> tuple[Teacher, Teacher, Student]:
    """The frozen teacher, the fake score and the student, as a task starts from them."""
    teacher, fake, student = cfg.models.teacher(), cfg.models.base(), cfg.models.student()
    teacher.load_state_dict(start.teacher)
    fake.load_state_dict(start.fake)
    student.load_state_dict(start.student)
    return teacher.eval().requires_grad_(False), fake, student


def run_task(cfg: DemoConfig, start: Start, seed: int, arm: str, cycles=None) -> dict:
    """One arm of one seed: fine-tune (unless ``arm == "start"``, the starting student), then evaluate.
    One thread per task, so a run's numbers do not depend on how many tasks run side by side.
    ``cycles`` (a queue, optional) receives one item per completed DMD cycle (the demo's progress bar)."""
    torch.set_num_threads(1)
    began, cpu = time.perf_counter(), time.process_time()
    teacher, fake, student = rebuild(cfg, start)
    on_cycle = None if cycles is None else lambda: cycles.put(1)
    log = None if arm == "start" else train_arm(cfg, teacher, fake, student, seed, arm, on_cycle=on_cycle)
    result = {"seed": seed, "arm": arm, "train": log, **evaluate_student(cfg, student.eval(), seed)}
    result["seconds"] = time.perf_counter() - began
    result["cpu_seconds"] = time.process_time() - cpu  # what the task costs on a core of its own
    return result
