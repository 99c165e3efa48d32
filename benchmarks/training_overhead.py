"""Training overhead of the foresight term per DMD cycle, measured next to the FLOP estimate.

    MIRAI_SELF_FORCING_DIR=/path/to/Self-Forcing python benchmarks/training_overhead.py

Copies the checkout, applies the patch with the mirai-plugin command, and times two
DMD cycles (10 iterations: 2 generator steps, 10 critic steps, 8 projector replays) of
the real upstream Trainer on tiny models (integration_tests/trainer_harness.py), with
and without foresight, 3 runs each (medians). The same shapes go through
mirai_plugin.flops for the predicted overhead.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from mirai_plugin import ForesightConfig
from mirai_plugin.flops import CycleShape, TransformerShape, dmd_cycle

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"foresight_student_layer": 1, "foresight_teacher_layer": 2}
RUNS, STEPS = 5, 10


def train_seconds(repo: Path, out: Path, overrides: dict) -> float:
    subprocess.run([sys.executable, str(ROOT / "integration_tests" / "trainer_harness.py"), "--checkout", str(repo),
                    "--config", "configs/video_mirai_dmd_chunkwise.yaml", "--steps", str(STEPS), "--out", str(out),
                    "--overrides", json.dumps(overrides)], check=True, capture_output=True)
    return torch.load(out / "result.pt", weights_only=False)["extra"]["timings"]["train_s"]


def main() -> None:
    source = os.environ.get("MIRAI_SELF_FORCING_DIR")
    if not source:
        sys.exit("set MIRAI_SELF_FORCING_DIR to a Self-Forcing checkout")
    work = Path(tempfile.mkdtemp(prefix="mirai-overhead-"))
    repo = work / "sf"
    subprocess.run(["git", "clone", "-q", source, str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "checkout", "-q", "33593df3e81fa3ec10239271dd2c100facac6de1"], check=True)
    subprocess.run([sys.executable, "-m", "mirai_plugin.cli", "patch", "apply", "--upstream", "self-forcing", str(repo)],
                   check=True, capture_output=True)
    times = {"off": [], "on": []}
    for run in range(RUNS):
        for case, weight in (("off", 0.0), ("on", 0.2)):
            times[case].append(train_seconds(repo, work / f"{case}{run}", {**LAYERS, "foresight_weight": weight}))
    off, on = statistics.median(times["off"]), statistics.median(times["on"])

    tiny = dict(text_tokens=512)
    cycle = CycleShape(generator=TransformerShape(64, 4, 128, **tiny), real_score=TransformerShape(96, 4, 192, **tiny),
                       critic=TransformerShape(64, 4, 128, **tiny), tokens_per_frame=16)
    predicted = dmd_cycle(cycle, ForesightConfig(student_layer=1, encoder_layer=2))["overhead"]
    measured = on / off - 1
    print(json.dumps({"seconds_without": round(off, 3), "seconds_with": round(on, 3),
                      "measured_overhead": round(measured, 3), "predicted_overhead": round(predicted, 3),
                      "measured_over_predicted": round(measured / predicted, 2), "runs": times}, indent=2))


if __name__ == "__main__":
    main()
