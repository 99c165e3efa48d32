"""Time `mirai-plugin compare` at the paper's scale: 946 prompts x 5 seeds, 16 dimensions, 10,000 replicates.

    python benchmarks/compare_speed.py

Writes two synthetic VBench result files and times loading plus the bootstrap.
"""

import json
import tempfile
import time
from pathlib import Path

from mirai_plugin.eval import compare, load_results
from mirai_plugin.eval.synthetic import synthetic_results


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="mirai-compare-"))
    for name, seed in (("baseline", 0), ("candidate", 1)):
        (folder / f"{name}_eval_results.json").write_text(json.dumps(synthetic_results(seed, prompts=946, seeds=5)))
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
