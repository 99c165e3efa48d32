"""Training overhead of the foresight term per DMD cycle, measured next to the FLOP estimate.

    eval "$(../shared/upstreams/unpack /tmp/up)" && python benchmarks/training_overhead.py

Copies the checkout (``MIRAI_SELF_FORCING_DIR``, integration_tests/checkouts.py), applies the
patch with the mirai-plugin command, and times two DMD cycles (10 iterations: 2 generator
steps, 10 critic steps, 8 projector replays) of the real upstream Trainer on tiny models
(integration_tests/trainer_harness.py), with and without foresight, 5 runs each (medians). The
same shapes go through mirai_plugin.tooling.flops for the predicted overhead.

``--before REV`` also runs the package as it was at commit REV of this repository (imported
through PYTHONPATH by the same patched trainer), interleaved run by run with the current one,
so both ratios come from one run on the same machine state.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from mirai_plugin import ForesightConfig
from mirai_plugin.tooling.flops import CycleShape, TransformerShape, dmd_cycle

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from integration_tests.checkouts import CheckoutMissing, checkout  # noqa: E402

LAYERS = {"foresight_student_layer": 1, "foresight_teacher_layer": 2}
RUNS, STEPS = 5, 10


def train_seconds(repo: Path, out: Path, overrides: dict, package: Path | None = None) -> float:
    env = dict(os.environ)
    if package is not None:  # an earlier version of mirai_plugin, ahead of the installed one
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package), env.get("PYTHONPATH")]))
    subprocess.run([sys.executable, str(ROOT / "integration_tests" / "trainer_harness.py"), "--checkout", str(repo),
                    "--config", "configs/video_mirai_dmd_chunkwise.yaml", "--steps", str(STEPS), "--out", str(out),
                    "--overrides", json.dumps(overrides)], check=True, capture_output=True, env=env)
    return torch.load(out / "result.pt", weights_only=False)["extra"]["timings"]["train_s"]


def export_package(rev: str, dest: Path) -> Path:
    """``mirai_plugin`` as it was at ``rev``, unpacked under ``dest``."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "mirai_plugin"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", metavar="REV", help="also time mirai_plugin at this commit, interleaved")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mirai-overhead-"))
    try:
        repo = checkout("self-forcing", work / "sf", "self-forcing")
    except CheckoutMissing as missing:
        sys.exit(str(missing))
    versions = {"now": None}
    if args.before:
        versions = {"before": export_package(args.before, work / "before"), **versions}
    times = {version: {"off": [], "on": []} for version in versions}
    for run in range(RUNS):
        for version, package in versions.items():
            for case, weight in (("off", 0.0), ("on", 0.2)):
                overrides = {**LAYERS, "foresight_weight": weight}
                times[version][case].append(train_seconds(repo, work / f"{version}{case}{run}", overrides, package))

    tiny = dict(text_tokens=512)
    cycle = CycleShape(generator=TransformerShape(64, 4, 128, **tiny), real_score=TransformerShape(96, 4, 192, **tiny),
                       critic=TransformerShape(64, 4, 128, **tiny), tokens_per_frame=16)
    predicted = dmd_cycle(cycle, ForesightConfig(student_layer=1, encoder_layer=2))["overhead"]
    report = {}
    for version, runs in times.items():
        off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
        measured = on / off - 1
        report[version] = {"seconds_without": round(off, 3), "seconds_with": round(on, 3),
                           "measured_overhead": round(measured, 3), "predicted_overhead": round(predicted, 3),
                           "measured_over_predicted": round(measured / predicted, 2), "runs": runs}
    print(json.dumps(report if args.before else report["now"], indent=2))


if __name__ == "__main__":
    main()
