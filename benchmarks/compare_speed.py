"""Time `mirai-plugin compare` at the paper's scale: 946 prompts x 5 seeds, 16 dimensions, 10,000 replicates.

    python benchmarks/compare_speed.py

Writes two synthetic VBench result files and times loading plus the bootstrap.
"""

import json
import tempfile
import time
from pathlib import Path

import torch

from mirai_plugin.tooling.eval import DIMENSIONS, compare, load_results


def result_file(seed: int, *, prompts: int, seeds: int) -> dict:
    """A VBench result file: every dimension, one uniform per-video value in [0.3, 0.7] per video."""
    g = torch.Generator().manual_seed(seed)
    data = {}
    for name in DIMENSIONS:
        values = (0.3 + 0.4 * torch.rand(prompts, seeds, generator=g)).tolist()
        scale = 100 if name == "imaging_quality" else 1  # VBench stores imaging quality on 0-100 per video
        entries = [{"video_path": f"/videos/prompt number {p}-{s}.mp4", "video_results": scale * v}
                   for p, row in enumerate(values) for s, v in enumerate(row)]
        data[name] = [sum(map(sum, values)) / (prompts * seeds), entries]
    return data


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="mirai-compare-"))
    for name, seed in (("baseline", 0), ("candidate", 1)):
        (folder / f"{name}_eval_results.json").write_text(json.dumps(result_file(seed, prompts=946, seeds=5)))
    start = time.perf_counter()
    baseline = load_results([folder / "baseline_eval_results.json"])
    candidate = load_results([folder / "candidate_eval_results.json"])
    loaded = time.perf_counter()
    rows = compare(baseline, candidate, replicates=10_000, seed=0)
    done = time.perf_counter()
    print(f"load {loaded - start:.2f}s, bootstrap {done - loaded:.2f}s (946 prompts x 5 seeds x 16 dimensions, "
          f"10,000 replicates); total diff {rows[-1].difference:+.3f} [{rows[-1].low:+.3f}, {rows[-1].high:+.3f}]")


if __name__ == "__main__":
    main()
