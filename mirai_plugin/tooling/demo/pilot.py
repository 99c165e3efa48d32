"""Registration 2's pilot: the run's size chosen on the positive control alone.

On seeds the reported run never uses, the baseline and the positive control (the foresight
arm never runs here) are fine-tuned for the largest candidate number of generator steps, and
their students' primary metric is read at every candidate number of steps along the way, on
the largest candidate number of evaluation videos (a smaller candidate is its first blocks:
exactly what a run with fewer videos evaluates). For each candidate (steps, videos) and pilot
seed, the control's effect is the paired bootstrap CI of control minus baseline over that
seed's videos. The control is **detected** at a candidate when, on at least
``min_detecting_seeds`` pilot seeds, its CI excludes 0 with a half-width at most
``max_half_width_ratio`` times |effect|, all in one direction.

The full run's wall time on ``workers`` cores is predicted from what the pilot measured: the
stages before the students (models, gate, fake warm-up), the seconds per DMD cycle of the
baseline and of the control (the foresight arm's cycle is the control's: the same work on
another video), a full evaluation of one student at each candidate number of videos, and
``OVERHEAD_SECONDS``; the tasks are placed on the workers in the demo's order, each on the
first free worker. The choice: among the candidates that detect the control and fit the
budget with the fewest candidate seeds, the one with the shortest predicted time; then the
most seeds that keep it within the budget. No such candidate: the full run could not say
anything, and the pilot says so.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from multiprocessing import get_context

import torch

from mirai_plugin.tooling.demo.experiment import Start, evaluate_student, rebuild, train_arm
from mirai_plugin.tooling.demo.progress import Progress
from mirai_plugin.tooling.demo.registration import DemoConfig, PilotSettings, with_size
from mirai_plugin.tooling.demo.report import paired_bootstrap

OVERHEAD_SECONDS = 20.0  # interpreter start and imports, worker processes, the report and the figure
TASK_ORDER = ("foresight", "control", "baseline")  # the demo's: the longest tasks first, the starting students last


def predict_seconds(costs: dict, *, generator_steps: int, eval_videos: int, seed_count: int, workers: int) -> float:
    """Predicted wall time of a full run (three arms and each seed's starting student) from the pilot's costs."""
    evaluation = costs["evaluation_seconds"][str(eval_videos)]
    cycle = {"baseline": costs["cycle_seconds"]["baseline"], "control": costs["cycle_seconds"]["control"],
             "foresight": costs["cycle_seconds"]["control"]}
    tasks = [generator_steps * cycle[arm] + evaluation for arm in TASK_ORDER for _ in range(seed_count)]
    tasks += [evaluation] * seed_count
    free = [0.0] * workers
    for seconds in tasks:
        free[free.index(min(free))] += seconds
    return costs["serial_seconds"] + OVERHEAD_SECONDS + max(free)


def detection(baseline: dict[int, list[float]], control: dict[int, list[float]], pilot: PilotSettings, *,
              replicates: int, seed: int, level: float) -> dict:
    """Whether the control's effect is detected, from per-seed per-video errors ``{pilot seed: [...]}``."""
    per_seed = []
    for pilot_seed in pilot.seeds:
        ci = paired_bootstrap(baseline[pilot_seed], control[pilot_seed], replicates=replicates, seed=seed, level=level)
        half = (ci["high"] - ci["low"]) / 2
        excludes = ci["low"] > 0 or ci["high"] < 0
        detected = excludes and half <= pilot.max_half_width_ratio * abs(ci["difference"])
        per_seed.append({"seed": pilot_seed, "difference": ci["difference"], "low": ci["low"], "high": ci["high"],
                         "half_width": half, "detected": detected})
    lower = sum(1 for s in per_seed if s["detected"] and s["difference"] < 0)
    higher = sum(1 for s in per_seed if s["detected"] and s["difference"] > 0)
    direction = "lower" if lower >= higher else "higher"
    return {"per_seed": per_seed, "detecting_seeds": max(lower, higher), "direction": direction,
            "detected": max(lower, higher) >= pilot.min_detecting_seeds}


def choose(candidates: list[dict], pilot: PilotSettings) -> dict | None:
    """The registered choice among the evaluated candidates (see the module docstring); None when none qualifies."""
    fewest = min(pilot.seed_counts)
    fitting = [c for c in candidates
               if c["detection"]["detected"] and c["predicted_seconds"][str(fewest)] <= pilot.budget_seconds]
    if not fitting:
        return None
    best = min(fitting, key=lambda c: (c["predicted_seconds"][str(fewest)], c["generator_steps"], c["eval_videos"]))
    seeds = max(s for s in pilot.seed_counts if best["predicted_seconds"][str(s)] <= pilot.budget_seconds)
    return {"generator_steps": best["generator_steps"], "eval_videos": best["eval_videos"],
            "seeds": list(range(seeds)), "predicted_seconds": best["predicted_seconds"][str(seeds)]}


def pilot_task(cfg: DemoConfig, start: Start, seed: int, arm: str, keep_student: bool = False) -> dict:
    """One (pilot seed, arm): DMD for the largest candidate number of steps, the primary metric at each candidate."""
    torch.set_num_threads(1)
    teacher, fake, student = rebuild(cfg, start)
    errors: dict[str, list[float]] = {}

    def read(current, cycles: int) -> None:
        errors[str(cycles)] = evaluate_student(cfg, current, seed, primary_only=True)["identity_error"]

    log = train_arm(cfg, teacher, fake, student, seed, arm, checkpoints=cfg.pilot.generator_steps, at_checkpoint=read)
    return {"seed": seed, "arm": arm, "identity_error": errors,
            "cycle_seconds": statistics.median(log["cycle_seconds"]),
            "student": {k: v.clone() for k, v in student.state_dict().items()} if keep_student else None}


def run_pilot(cfg: DemoConfig, start: Start, *, serial_seconds: float, workers: int, progress: Progress) -> dict:
    """The pilot's tasks, the costs they measure, every candidate's detection and predicted time, and the choice."""
    pilot, began = cfg.pilot, time.perf_counter()
    run = with_size(cfg, generator_steps=max(pilot.generator_steps), eval_videos=max(pilot.eval_videos),
                    seeds=pilot.seeds)
    tasks = [(seed, arm) for seed in pilot.seeds for arm in pilot.arms]
    outputs: list[dict] = []
    progress.note(f"pilot: {len(tasks)} tasks ({', '.join(pilot.arms)} on seeds {list(pilot.seeds)}), "
                  f"{max(pilot.generator_steps)} generator steps each, {workers} at a time")
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(pilot_task, run, start, seed, arm, i == 0) for i, (seed, arm) in enumerate(tasks)]
        for future in as_completed(futures):
            outputs.append(future.result())
            progress.note(f"  [{len(outputs)}/{len(tasks)}] seed {outputs[-1]['seed']} {outputs[-1]['arm']} "
                          f"(elapsed {time.perf_counter() - began:.0f}s)")
    by = {(o["seed"], o["arm"]): o for o in outputs}
    kept = next(o for o in outputs if o["student"] is not None)
    student = cfg.models.student()
    student.load_state_dict(kept["student"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    evaluation = {}
    try:
        for videos in pilot.eval_videos:  # a full evaluation (every metric), as each task of the run does
            timed = time.perf_counter()
            evaluate_student(replace(run, evaluation=replace(run.evaluation, eval_videos=videos)), student.eval(),
                             kept["seed"])
            evaluation[str(videos)] = time.perf_counter() - timed
    finally:
        torch.set_num_threads(threads)
    costs = {"serial_seconds": serial_seconds, "evaluation_seconds": evaluation,
             "cycle_seconds": {arm: statistics.median(by[s, arm]["cycle_seconds"] for s in pilot.seeds)
                               for arm in pilot.arms}}
    e = cfg.evaluation
    candidates = []
    for steps in pilot.generator_steps:
        for videos in pilot.eval_videos:
            errors = {arm: {s: by[s, arm]["identity_error"][str(steps)][:videos] for s in pilot.seeds}
                      for arm in pilot.arms}
            candidates.append({
                "generator_steps": steps, "eval_videos": videos,
                "mean_error": {arm: statistics.fmean(x for s in pilot.seeds for x in errors[arm][s])
                               for arm in pilot.arms},
                "detection": detection(errors["baseline"], errors["control"], pilot,
                                       replicates=e.bootstrap_replicates, seed=e.bootstrap_seed,
                                       level=e.bootstrap_level),
                "predicted_seconds": {str(n): predict_seconds(costs, generator_steps=steps, eval_videos=videos,
                                                              seed_count=n, workers=pilot.workers)
                                      for n in pilot.seed_counts},
            })
    return {"costs": costs, "candidates": candidates, "chosen": choose(candidates, pilot),
            "seconds": time.perf_counter() - began}
