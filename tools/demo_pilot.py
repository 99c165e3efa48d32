"""Registration 2's pilot: size the demo's run on the positive control, then write the addendum.

    python tools/demo_pilot.py [--workers 2] [--record mirai-pilot.json]

Runs the demo's stages before the students exactly as ``mirai-plugin demo`` does (the shipped
models, the encoder gate, the fake score's warm-up), stops when the gate fails, then the pilot
(``mirai_plugin.tooling.demo.pilot``): the baseline and the positive control on the pilot
seeds, every candidate (generator steps, evaluation videos) and the registered choice. Prints
the candidates, writes the whole record to ``--record``, and, when a candidate qualifies, the
addendum ``registrations/<N>-pilot.json`` (its choice and the record); its sha256 then goes
into ``docs/demo-registration-<N>-pilot.md``. Refuses to overwrite an existing addendum.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from mirai_plugin.tooling.demo.pilot import run_pilot
from mirai_plugin.tooling.demo.progress import Progress
from mirai_plugin.tooling.demo.registration import CURRENT, addendum_path, load_config, registration_path
from mirai_plugin.tooling.demo.run import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int)
    parser.add_argument("--record", type=Path, default=Path("mirai-pilot.json"))
    args = parser.parse_args()
    cfg = load_config(CURRENT, addendum=False)
    addendum = addendum_path(cfg.registration)
    if cfg.pilot is None:
        raise SystemExit(f"registration {cfg.registration} has no pilot")
    if addendum.exists():
        raise SystemExit(f"{addendum} exists: the pilot has run; a new pilot is a new registration")
    torch.set_num_threads(1)
    began, load = time.perf_counter(), list(os.getloadavg())
    progress = Progress()
    prepared = prepare(cfg, progress)
    record = {"registration": cfg.registration,
              "registration_sha256": hashlib.sha256(registration_path(cfg.registration).read_bytes()).hexdigest(),
              "models_source": prepared.models.source, "gate": prepared.gate, "load_before": load}
    if prepared.start is None:
        record["status"] = "blocked: the teacher did not pass the encoder gate; the pilot did not run"
        args.record.write_text(json.dumps(record, indent=2))
        raise SystemExit(f"{record['status']} (wrote {args.record})")
    serial = time.perf_counter() - began
    pilot = run_pilot(cfg, prepared.start, serial_seconds=serial, workers=args.workers or cfg.pilot.workers,
                      progress=progress)
    record.update(pilot=pilot, load_after=list(os.getloadavg()), wall_seconds=time.perf_counter() - began)
    print(f"\n{'steps':>5s} {'videos':>6s}  {'baseline':>8s} {'control':>8s}  per pilot seed: control - baseline "
          f"[95% CI] (detected)   {'predicted s (3 seeds)':>22s}")
    fewest = str(min(cfg.pilot.seed_counts))
    for c in pilot["candidates"]:
        seeds = "  ".join(f"{s['difference']:+.2f} [{s['low']:+.2f}, {s['high']:+.2f}]{'*' if s['detected'] else ' '}"
                          for s in c["detection"]["per_seed"])
        print(f"{c['generator_steps']:5d} {c['eval_videos']:6d}  {c['mean_error']['baseline']:8.2f} "
              f"{c['mean_error']['control']:8.2f}  {seeds}  {'DETECTED' if c['detection']['detected'] else '':8s} "
              f"{c['predicted_seconds'][fewest]:8.0f}")
    print(f"costs: {json.dumps(pilot['costs'])}")
    chosen = pilot["chosen"]
    if chosen is None:
        record["status"] = "blocked: no candidate detects the positive control within the time budget"
        args.record.write_text(json.dumps(record, indent=2))
        raise SystemExit(f"{record['status']} (wrote {args.record})")
    record["status"] = "sized"
    args.record.write_text(json.dumps(record, indent=2))
    addendum.write_text(json.dumps({"chosen": {k: chosen[k] for k in ("generator_steps", "eval_videos", "seeds")},
                                    **record}, indent=2) + "\n")
    print(f"chosen: {chosen}; wrote {addendum} and {args.record}; "
          f"sha256 {hashlib.sha256(addendum.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main()
