"""Synthetic VBench result files with known aggregates, for the tests.

Per-video values are drawn inside each dimension's normalisation range; the
aggregate is computed the way VBench aggregates its per-video entries (ratios of
counts where VBench stores counts, imaging quality on 0-100 per video).
"""

from __future__ import annotations

import torch

from mirai_plugin.tooling.eval.vbench_score import DIMENSIONS, NORMALISATION

COUNTED = {"background_consistency": ("video_sim", "cnt_per_video"),
           "object_class": ("success_frame_count", "frame_count"),
           "multiple_objects": ("success_frame_count", "frame_count"),
           "scene": ("success_frame_count", "frame_count")}


def synthetic_results(seed: int = 0, *, prompts: int = 12, seeds: int = 3, shift: dict | None = None) -> dict:
    """A result file whose aggregates follow VBench's own aggregation of its per-video entries."""
    g = torch.Generator().manual_seed(seed)
    data = {}
    for _d, name in enumerate(DIMENSIONS):
        low, high = NORMALISATION[name]
        entries, num, den = [], 0.0, 0.0
        for p in range(prompts):
            for s in range(seeds):
                value = low + (high - low) * (0.3 + 0.4 * torch.rand(1, generator=g).item())
                if shift and name in shift:
                    value += shift[name]
                entry = {"video_path": f"/videos/prompt number {p}-{s}.mp4"}
                if name in COUNTED:
                    count = 10 + (p + s) % 7
                    key, count_key = COUNTED[name]
                    entry.update({key: value * count, count_key: count, "video_results": value})
                    num, den = num + value * count, den + count
                elif name == "imaging_quality":
                    entry["video_results"] = 100 * value
                    num, den = num + value, den + 1
                else:
                    entry["video_results"] = value
                    num, den = num + value, den + 1
                entries.append(entry)
        data[name] = [num / den, entries]
    return data
