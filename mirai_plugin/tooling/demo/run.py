"""``mirai-plugin demo``: the encoder gate, then DMD with and without foresight, a positive control, a verdict.

Stages, each with its progress bar: the models (shipped or cached; trained only when asked),
the gate (printed before any student is trained; a full run stops there when it fails), the
fake score's warm-up, then every (seed, arm) task, two or more at a time in worker
processes, then the report. The settings are a registration's (``registration.py``).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import Manager, get_context
from pathlib import Path
from queue import Empty

import torch

from mirai_plugin.errors import MiraiError
from mirai_plugin.tooling.demo.evaluation import encoder_gate
from mirai_plugin.tooling.demo.experiment import Start, run_task, warm_up_fake
from mirai_plugin.tooling.demo.pretrained import Models, models_key, state_copy
from mirai_plugin.tooling.demo.progress import Progress
from mirai_plugin.tooling.demo.registration import (
    ARMS,
    CURRENT,
    DemoConfig,
    check_models,
    load_config,
    quick,
    require_sized,
)
from mirai_plugin.tooling.demo.report import figure, summarise, table, verdict
from mirai_plugin.tooling.demo.store import obtain_models, shipped_folder


def ready_to_run(number: int) -> str:
    """What registration ``number`` still lacks to run as registered (empty when nothing): its models shipped
    under their key, and its size fixed by the registration or its pilot addendum."""
    cfg = load_config(number)
    missing = [] if shipped_folder(cfg.models) is not None else ["its models are not shipped yet"]
    if not cfg.sized:
        missing.append("its pilot addendum is not committed yet")
    return " and ".join(missing)


def default_registration() -> tuple[int, str]:
    """The newest registration ready to run, and why any newer one is not (empty when it is the current one)."""
    missing = ready_to_run(CURRENT)
    if not missing:
        return CURRENT, ""
    for number in range(CURRENT - 1, 0, -1):
        if not ready_to_run(number):
            return number, (f"registration {CURRENT} is not ready to run ({missing}): running registration "
                            f"{number}, its predecessor")
    return CURRENT, ""  # nothing is ready: the current registration's own error says what is missing


def make_config(*, registration: int = CURRENT, quick_run: bool = False, steps: int | None = None,
                seeds: int | None = None, offsets: tuple[int, ...] | None = None,
                layer: int | None = None) -> DemoConfig:
    """A registration's settings, the ``--quick`` preset, then explicit options (each recorded as a deviation)."""
    cfg = load_config(registration)
    if quick_run:
        cfg = quick(cfg)
    deviations = list(cfg.deviations)
    if steps is not None:
        if steps < 1:
            raise MiraiError(f"--steps must be >= 1 (generator steps), got {steps}")
        cfg = replace(cfg, dmd=replace(cfg.dmd, generator_steps=steps))
        deviations.append(f"generator_steps={steps}")
    if seeds is not None:
        if seeds < 1:
            raise MiraiError(f"--seeds must be >= 1, got {seeds}")
        cfg = replace(cfg, seeds=tuple(range(seeds)))
        deviations.append(f"seeds={seeds}")
    foresight = dict(cfg.foresight)
    if offsets is not None:
        # the student generates segments 1 .. K-1 of a K-segment training clip: offset d has a target for some
        # of them only when d <= K - 2
        furthest = cfg.train_segments - 2
        unused = [d for d in offsets if d > furthest]
        if unused:
            raise MiraiError(
                f"--offsets {' '.join(map(str, unused))}: no generated segment of a {cfg.train_segments}-segment "
                f"training clip (the first given) has a target that far ahead; the furthest offset with a target "
                f"is {furthest}")
        foresight["offsets"] = tuple(offsets)
        deviations.append(f"offsets={tuple(offsets)}")
    if layer is not None:
        depth = cfg.models.student_depth
        if not 0 <= layer < depth:
            raise MiraiError(f"layer {layer} out of range: the demo student has {depth} blocks (0..{depth - 1})")
        foresight["student_layer"] = foresight["encoder_layer"] = layer  # same relative depth: equal depths
        deviations.append(f"layer={layer}")
    cfg = replace(cfg, foresight=foresight, deviations=tuple(deviations))
    if cfg.evaluation.eval_videos is None and cfg.dmd.generator_steps is not None and cfg.seeds is not None:
        cfg = replace(cfg, evaluation=replace(cfg.evaluation, eval_videos=max(cfg.pilot.eval_videos)),
                      deviations=(*cfg.deviations, f"eval_videos={max(cfg.pilot.eval_videos)}"))
    cfg.foresight_config()  # validates offsets and the rest of the foresight settings
    check_models(cfg.models)
    require_sized(cfg)
    return cfg


def is_quick(cfg: DemoConfig) -> bool:
    return any(d.startswith("--quick") for d in cfg.deviations)


def run_demo(cfg: DemoConfig, out: Path, *, workers: int | None = None, progress: Progress | None = None,
             train_models: bool = False) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every stage single-threaded: the numbers do not depend on the machine's core count
    try:
        return _run(cfg, out, workers, progress or Progress(), train_models or is_quick(cfg))
    finally:
        torch.set_num_threads(threads)


@dataclass
class Prepared:
    """What the stages before the students produce."""

    models: Models
    gate: dict
    start: Start | None  # None when the gate stopped the run
    timings: dict[str, float]


def prepare(cfg: DemoConfig, progress: Progress, *, workers: int | None = None, train_models: bool = False,
            warm_up: bool = True) -> Prepared:
    """The models, the gate (printed), and, when the gate passes (or ``--quick`` goes on), the fake score's
    warm-up: the demo's stages before any student is trained (the pilot runs the same)."""
    timings: dict[str, float] = {}
    stage = time.perf_counter()
    models = obtain_models(cfg.models, progress, workers=workers, train=train_models)
    timings["models"] = time.perf_counter() - stage
    print(f"models: {models.source}")

    stage = time.perf_counter()
    g, fcfg = cfg.gate, cfg.foresight_config()
    gate_scene = cfg.world.render(g.videos, cfg.models.train_frames, seed=80_000_000 + g.seed)
    gate = encoder_gate(models.teacher, gate_scene, layer=fcfg.encoder_layer, offsets=fcfg.offsets,
                        segment_frames=cfg.segment_frames, test_videos=g.test_videos, hidden=g.probe_hidden,
                        steps=g.probe_steps, lr=g.probe_lr, batch=g.probe_batch, seed=g.seed, progress=progress)
    gate["passed"] = gate["hidden"]["margin"] >= g.margin_db
    timings["gate"] = time.perf_counter() - stage
    print(gate_line(gate, g.margin_db, encoder_layer=fcfg.encoder_layer, offsets=fcfg.offsets)
          + (" [--quick goes on regardless]" if is_quick(cfg) and not gate["passed"] else ""))
    if not warm_up or not (gate["passed"] or is_quick(cfg)):
        return Prepared(models, gate, None, timings)

    stage = time.perf_counter()
    fake = warm_up_fake(cfg, models.base, models.student, progress)
    start = Start(state_copy(models.teacher), fake, state_copy(models.student))
    timings["fake warm-up"] = time.perf_counter() - stage
    return Prepared(models, gate, start, timings)


def _load() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _run(cfg: DemoConfig, out: Path, workers: int | None, progress: Progress, train_models: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    began, cpu_began, load_before = time.perf_counter(), time.process_time(), _load()
    print(f"registration {cfg.registration}" + (f" (deviations: {'; '.join(cfg.deviations)})" if cfg.deviations
                                                else ""))
    prepared = prepare(cfg, progress, workers=workers, train_models=train_models)
    gate, timings = prepared.gate, prepared.timings
    results = {"registration": cfg.registration, "config": cfg.to_dict(), "models_key": models_key(cfg.models),
               "models_source": prepared.models.source, "models_training": prepared.models.training, "gate": gate,
               "deviations": list(cfg.deviations)}
    if prepared.start is None:
        results["status"] = "blocked: the teacher did not pass the encoder gate"
        results.update(wall_seconds=time.perf_counter() - began, load={"before": load_before, "after": _load(),
                                                                        "cpus": os.cpu_count()})
        (out / "results.json").write_text(json.dumps(results, indent=2))
        print(f"\nstopped: {results['status']}; no student was trained. Wrote {out / 'results.json'}")
        return results

    stage = time.perf_counter()
    # the longest tasks first (the foresight arms, then the baseline, then the starting students' evaluations)
    order = {arm: i for i, arm in enumerate(("foresight", "control", "baseline"))}
    tasks = sorted(((seed, arm) for seed in cfg.seeds for arm in cfg.arms), key=lambda task: order.get(task[1], 0))
    tasks += [(seed, "start") for seed in cfg.seeds]
    workers = workers or min(len(tasks), os.cpu_count() or 1)
    outputs = _run_tasks(cfg, prepared.start, tasks, workers, progress)
    timings["students"] = time.perf_counter() - stage

    e = cfg.evaluation
    summary = summarise(outputs, replicates=e.bootstrap_replicates, seed=e.bootstrap_seed, level=e.bootstrap_level)
    ratios = {arm: summary["per_seed"][arm]["gradient_ratio"] for arm in ("foresight", "control") if arm in cfg.arms}
    print("step-0 |grad of the weighted term| / |grad of DMD| on the student: "
          + "; ".join(f"{arm} {' '.join(f'{v:.3f}' for v in values)}" for arm, values in ratios.items()))
    # On a machine of its own the run takes about its own CPU time plus the tasks' CPU time over the workers.
    serial_cpu = time.process_time() - cpu_began
    task_cpu = sum(r["cpu_seconds"] for r in outputs)
    said = verdict(summary)
    if is_quick(cfg):
        said = "[--quick: tiny models, a few generator steps: these numbers test the plumbing, not the method]\n" + said
    results.update(status="complete", per_run=outputs, summary=summary, verdict=said, timings=timings,
                   workers=workers, wall_seconds=time.perf_counter() - began,
                   cpu_seconds={"main_process": serial_cpu, "tasks": task_cpu},
                   load={"before": load_before, "after": _load(), "cpus": os.cpu_count()})
    (out / "results.json").write_text(json.dumps(results, indent=2))
    figure(summary, gate, out / "figure.png", train_segments=cfg.train_segments)
    print("\n" + table(summary))
    print("\nverdict:\n" + results["verdict"])
    if cfg.deviations:
        print(f"deviations from registration {cfg.registration}: " + "; ".join(cfg.deviations))
    print(f"wrote {out / 'results.json'} and {out / 'figure.png'} in {results['wall_seconds']:.0f}s "
          f"(CPU: {serial_cpu:.0f}s in this process, {task_cpu:.0f}s in {len(outputs)} tasks on {workers} workers)")
    return results


def gate_line(gate: dict, margin: float, *, encoder_layer: int, offsets: tuple[int, ...]) -> str:
    hidden, every = gate["hidden"], gate["all"]
    status = "PASSED" if gate["passed"] else "NOT PASSED"
    return (
        f"encoder gate ({status}, needs >= {margin:.1f} dB): readout of the reappearance segment from a wholly hidden "
        f"segment's FrozenEncoder(teacher, {encoder_layer}) features fused over offsets {tuple(offsets)}: "
        f"{hidden['features']:.2f} dB, from its pixels: {hidden['pixels']:.2f} dB (margin {hidden['margin']:+.2f} dB, "
        f"{hidden['test_pairs']} held-out pairs); every k -> k+1: {every['features']:.2f} vs {every['pixels']:.2f} dB"
    )


def _run_tasks(cfg: DemoConfig, start: Start, tasks: list[tuple[int, str]], workers: int,
               progress: Progress) -> list[dict]:
    """Every task, ``workers`` at a time; one bar over all their DMD cycles."""
    cycles_per_task = {arm: (0 if arm == "start" else cfg.dmd.generator_steps) for _, arm in tasks}
    bar = progress.bar(sum(cycles_per_task[arm] for _, arm in tasks), "students (DMD cycles)")
    progress.note(f"students: {len(tasks)} tasks ({len(cfg.seeds)} seeds x {', '.join(cfg.arms)}, and each seed's "
                  f"starting student), {workers} at a time")
    outputs: list[dict] = []
    if workers == 1:
        for seed, arm in tasks:
            outputs.append(run_task(cfg, start, seed, arm))
            bar.update(sum(cycles_per_task[o["arm"]] for o in outputs))
        bar.close()
        return outputs
    done = 0
    with Manager() as manager, ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        cycles = manager.Queue()
        futures = [pool.submit(run_task, cfg, start, seed, arm, cycles) for seed, arm in tasks]
        pending = set(futures)
        while pending:
            try:
                done += cycles.get(timeout=0.5)
                bar.update(done)
            except Empty:
                pass
            for future in [f for f in pending if f.done()]:
                pending.discard(future)
                outputs.append(future.result())
    bar.close()
    return outputs


__all__ = ["ARMS", "make_config", "prepare", "run_demo"]
