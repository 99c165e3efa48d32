"""Train the video demo's teacher, base and student under a registration's settings, and ship them.

    python tools/train_demo_models.py [--registration 2] [--workers 2] [--out DIR] [--resume DIR]

Writes ``teacher.safetensors``, ``student.safetensors`` and ``base.safetensors`` to
``mirai_plugin/tooling/demo/weights/registration-<N>`` (each recording the key of the settings
and the code that produced them, ``models_key``, and its training log: the readings on the
validation clips at every check, why the training stopped, its steps and seconds). Each
model trains on one core, single-threaded, so the weights do not depend on how many run side
by side. Under registration 2 each model trains to its criterion (``pretrained.py``); the
encoder gate is not evaluated here: it is evaluated once, on the final teacher, by the pilot
(``tools/demo_pilot.py``) and by ``mirai-plugin demo``. Under the ``quality`` schedule each model
keeps a resume file in ``--resume`` (by default the models' cache folder) every ``check_every``
steps: run the same command again after an interruption and it continues, to the same weights.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from mirai_plugin.tooling.demo.pretrained import NAMES, models_key, train_models
from mirai_plugin.tooling.demo.progress import Progress
from mirai_plugin.tooling.demo.registration import CURRENT, load_config
from mirai_plugin.tooling.demo.store import SHIPPED, cache_folder, save_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registration", type=int, default=CURRENT)
    parser.add_argument("--workers", type=int, default=min(len(NAMES), os.cpu_count() or 1))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--resume", type=Path, help="folder of the resume files (default: the models' cache folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.registration, addendum=False)
    out = args.out or SHIPPED / f"registration-{args.registration}"
    resume = args.resume or cache_folder(cfg.models) / "resume"
    print(f"resume files in {resume}")
    start = time.perf_counter()
    models = train_models(cfg.models, Progress(), workers=args.workers, resume_folder=resume)
    wall = time.perf_counter() - start
    save_models(out, cfg.models, models)
    print(f"wrote {out} (key {models_key(cfg.models)}) after {wall:.0f}s of wall time on {args.workers} workers "
          f"({os.cpu_count()} CPUs)")
    for name in NAMES:
        log = models.training[name]
        line = f"  {name}: {log['steps']} steps in {log['seconds']:.0f}s" + (
            " of processor time" if log["schedule"] == "quality" else "")
        if log["schedule"] == "quality":
            final = log["final"]
            errors = ", ".join(f"t={t} {e:.1f}%" for t, e in final["colour_error"].items())
            line += (f"; {log['stopped']}; final validation loss {final['loss']:.5f}, "
                     f"reappearance colour error {errors}")
        print(line)


if __name__ == "__main__":
    main()
