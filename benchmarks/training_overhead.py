"""Training overhead of the foresight term per DMD cycle, measured next to the FLOP estimate.

    eval "$(../shared/upstreams/unpack /tmp/up)" && python benchmarks/training_overhead.py

Copies the checkout (``MIRAI_SELF_FORCING_DIR``, integration_tests/checkouts.py), applies the
patch with the mirai-plugin command, and times two DMD cycles (10 iterations: 2 generator
steps, 10 critic steps, 8 projector replays) of the real upstream Trainer on tiny models
(integration_tests/trainer_harness.py), with and without foresight, 5 runs each (medians). The same shapes go through
mirai_plugin.flops for the predicted overhead.
"""

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from mirai_plugin import ForesightConfig
from mirai_plugin.flops import CycleShape, TransformerShape, dmd_cycle

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from integration_tests.checkouts import CheckoutMissing, checkout  # noqa: E402

LAYERS = {"foresight_student_layer": 1, "foresight_teacher_layer": 2}
RUNS, STEPS = 5, 10


def train_seconds(repo: Path, out: Path, overrides: dict) -> float:
    subprocess.run([sys.executable, str(ROOT / "integration_tests" / "trainer_harness.py"), "--checkout", str(repo),
                    "--config", "configs/video_mirai_dmd_chunkwise.yaml", "--steps", str(STEPS), "--out", str(out),
                    "--overrides", json.dumps(overrides)], check=True, capture_output=True)
    return torch.load(out / "result.pt", weights_only=False)["extra"]["timings"]["train_s"]


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="mirai-overhead-"))
    try:
        repo = checkout("self-forcing", work / "sf", "self-forcing")
    except CheckoutMissing as missing:
        sys.exit(str(missing))
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
