"""Reading VBench result files into per-prompt terms that re-aggregate exactly as VBench does.

A result file (``<name>_eval_results.json``) maps each dimension to
``[aggregate, [{"video_path": ..., "video_results": ..., ...}, ...]]``. VBench's
aggregate is a ratio of sums: for the dimensions whose per-video entries carry
counts (``video_sim``/``cnt_per_video``, ``success_frame_count``/``frame_count``)
it is frame-weighted; subject consistency is frame-weighted too but stores only
the per-video mean, so frame counts come from ``frames`` (equal counts when not
given, which is exact for equal-length videos); the rest are means over videos;
imaging quality's per-video values are on a 0-100 scale.

Each video is reduced to a ``(numerator, denominator)`` pair; the videos of one
prompt (its seeds, ``<prompt>-<seed>.mp4``) are averaged, so the prompt is the
unit; a dimension's score is ``sum(numerator) / sum(denominator)`` over prompts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mirai_plugin.errors import MiraiError
from mirai_plugin.eval.vbench_score import DIMENSIONS, canonical

_SEED_SUFFIX = re.compile(r"-\d+$")


@dataclass(frozen=True)
class DimensionResult:
    name: str
    reported: float  # the aggregate VBench wrote
    prompts: tuple[str, ...]
    numerator: Tensor  # (prompts,) float64
    denominator: Tensor  # (prompts,) float64
    videos: int

    @property
    def score(self) -> float:
        return (self.numerator.sum() / self.denominator.sum()).item()


def prompt_of(video_path: str) -> str:
    """``.../a cat playing-3.mp4`` -> ``a cat playing`` (VBench names videos ``<prompt>-<seed>``)."""
    return _SEED_SUFFIX.sub("", Path(video_path).stem)


def _terms(name: str, entry: Mapping, frames: Mapping[str, int] | None) -> tuple[float, float]:
    if "video_sim" in entry and "cnt_per_video" in entry:
        return float(entry["video_sim"]), float(entry["cnt_per_video"])
    if "success_frame_count" in entry and "frame_count" in entry:
        return float(entry["success_frame_count"]), float(entry["frame_count"])
    value = entry.get("video_results")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MiraiError(f"{name}: per-video entry without a numeric 'video_results': {dict(entry)!r}"[:300])
    value = float(value)
    if name == "imaging_quality":
        value /= 100.0  # per-video values are on a 0-100 scale; VBench divides the mean by 100
    if name == "subject_consistency" and frames is not None:
        weight = float(frames[Path(entry["video_path"]).name] - 1)  # frame pairs of the video
        return value * weight, weight
    return value, 1.0


def dimension_from_entries(
    name: str, reported: float, entries: Iterable[Mapping], *, frames: Mapping[str, int] | None = None
) -> DimensionResult:
    per_prompt: dict[str, list[tuple[float, float]]] = {}
    count = 0
    for entry in entries:
        if not isinstance(entry, Mapping) or "video_path" not in entry:
            raise MiraiError(f"{name}: per-video entries must be objects with a 'video_path', got {entry!r}"[:300])
        per_prompt.setdefault(prompt_of(entry["video_path"]), []).append(_terms(name, entry, frames))
        count += 1
    if not per_prompt:
        raise MiraiError(f"{name}: no per-video results; the bootstrap needs VBench's per-video entries")
    prompts = tuple(per_prompt)
    terms = torch.tensor([[sum(t[i] for t in per_prompt[p]) / len(per_prompt[p]) for i in (0, 1)] for p in prompts],
                         dtype=torch.float64)
    return DimensionResult(name, float(reported), prompts, terms[:, 0], terms[:, 1], count)


def load_results(paths: Iterable[str | Path], *, frames: Mapping[str, int] | None = None) -> dict[str, DimensionResult]:
    """Merge VBench result files (one or several) into ``{dimension: DimensionResult}``."""
    results: dict[str, DimensionResult] = {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise MiraiError(f"cannot read VBench results {path}: {error}") from None
        if not isinstance(data, dict):
            raise MiraiError(f"{path}: expected {{dimension: [aggregate, [per-video results]]}}, got {type(data).__name__}")
        for key, value in data.items():
            name = canonical(key)
            if name not in DIMENSIONS:
                raise MiraiError(f"{path}: unknown VBench dimension {key!r}; the 16 are {list(DIMENSIONS)}")
            if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (int, float))
                    and isinstance(value[1], list)):
                raise MiraiError(f"{path}: {key!r} must be [aggregate, [per-video results]], got {str(value)[:120]}")
            if name in results:
                raise MiraiError(f"{path}: dimension {name!r} appears in more than one result file")
            results[name] = dimension_from_entries(name, value[0], value[1], frames=frames)
    return results
