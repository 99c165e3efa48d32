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
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mirai_plugin.errors import MiraiError
from mirai_plugin.tooling.eval.vbench_score import DIMENSIONS, canonical, check_score

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


def _number(name: str, entry: Mapping, key: str) -> float:
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise MiraiError(
            f"{name}: {key} of {entry.get('video_path', 'a video')!r} must be a finite number >= 0, got {value!r}"
        )
    return float(value)


def _terms(name: str, entry: Mapping, frames: Mapping[str, int] | None) -> tuple[float, float]:
    video = entry["video_path"]
    for top, bottom in (("video_sim", "cnt_per_video"), ("success_frame_count", "frame_count")):
        if top in entry and bottom in entry:
            numerator, denominator = _number(name, entry, top), _number(name, entry, bottom)
            if denominator == 0 or numerator > denominator * (1 + 1e-9):
                raise MiraiError(
                    f"{name}: {video!r} has {top}={numerator!r} and {bottom}={denominator!r}; VBench's per-video "
                    f"ratio {top} / {bottom} lies in [0, 1] with {bottom} > 0"
                )
            return numerator, denominator
    value = entry.get("video_results")
    if isinstance(value, bool):
        # dynamic degree, human action: VBench stores a yes/no per video, the aggregate is the rate
        value = float(value)
    if not isinstance(value, (int, float)):
        raise MiraiError(f"{name}: per-video entry without a numeric 'video_results': {dict(entry)!r}"[:300])
    top = 100.0 if name == "imaging_quality" else 1.0  # imaging quality is on a 0-100 scale per video
    if not math.isfinite(value) or not 0 <= value <= top:
        raise MiraiError(f"{name}: video_results of {video!r} must be in [0, {top:g}] (VBench's range), got {value!r}")
    value = float(value) / top
    if name == "subject_consistency" and frames is not None:
        key = Path(video).name
        if key not in frames:
            raise MiraiError(
                f"--frames has no frame count for {key!r} ({name}); the JSON must map every video file name "
                f"to its number of frames"
            )
        count = frames[key]
        if isinstance(count, bool) or not isinstance(count, int) or count < 2:
            raise MiraiError(f"--frames gives {key!r} {count!r} frames; a frame count is an int >= 2")
        weight = float(count - 1)  # frame pairs of the video
        return value * weight, weight
    return value, 1.0


def dimension_from_entries(
    name: str, reported: float, entries: Iterable[Mapping], *, frames: Mapping[str, int] | None = None
) -> DimensionResult:
    per_prompt: dict[str, list[tuple[float, float]]] = {}
    count = 0
    for entry in entries:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("video_path"), str):
            raise MiraiError(f"{name}: per-video entries must be objects with a 'video_path', got {entry!r}"[:300])
        per_prompt.setdefault(prompt_of(entry["video_path"]), []).append(_terms(name, entry, frames))
        count += 1
    if not per_prompt:
        raise MiraiError(
            f"{name}: no per-video results; the paired bootstrap (compare) needs VBench's per-video entries "
            f"(`mirai-plugin score` reads the aggregates alone)"
        )
    prompts = tuple(per_prompt)
    terms = torch.tensor([[sum(t[i] for t in per_prompt[p]) / len(per_prompt[p]) for i in (0, 1)] for p in prompts],
                         dtype=torch.float64)
    return DimensionResult(name, float(reported), prompts, terms[:, 0], terms[:, 1], count)


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' ``object_pairs_hook``: a key given twice is refused (JSON keeps the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise MiraiError(f"the key {key!r} appears twice in one JSON object; keep one of them")
        out[key] = value
    return out


def _read_results(paths: Iterable[str | Path]) -> Iterator[tuple[Path, str, str, float, list]]:
    """``(path, key, dimension, aggregate, per-video entries)`` of every dimension of every file, checked."""
    seen: dict[str, tuple[Path, str]] = {}
    for path in paths:
        path = Path(path)
        try:
            data = json.loads(path.read_text(), object_pairs_hook=unique_keys)
        except OSError as error:
            raise MiraiError(f"cannot read VBench results {path}: {error.strerror or error}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise MiraiError(f"{path} is not a VBench result file (not JSON: {error})") from None
        if not isinstance(data, dict) or not data:
            got = "an empty object" if data == {} else type(data).__name__
            raise MiraiError(f"{path}: expected {{dimension: [aggregate, [per-video results]]}}, got {got}")
        for key, value in data.items():
            name = canonical(key)
            if name not in DIMENSIONS:
                raise MiraiError(f"{path}: unknown VBench dimension {key!r}; the 16 are {list(DIMENSIONS)}")
            if not (isinstance(value, list) and len(value) == 2 and isinstance(value[1], list)):
                raise MiraiError(f"{path}: {key!r} must be [aggregate, [per-video results]], got {str(value)[:120]}")
            if name in seen:
                first, spelling = seen[name]
                if first == path:
                    raise MiraiError(f"{path}: dimension {name!r} appears twice, as {spelling!r} and {key!r}; keep one")
                raise MiraiError(
                    f"dimension {name!r} appears in more than one result file: {first} ({spelling!r}) and {path} "
                    f"({key!r}); pass each dimension once"
                )
            seen[name] = (path, key)
            yield path, key, name, check_score(name, value[0], where=f" in {path}"), value[1]


def load_aggregates(paths: Iterable[str | Path]) -> dict[str, float]:
    """``{dimension: aggregate}`` of VBench result files; the per-video entries may be empty, as
    VBench's own ``cal_final_score.py`` reads only the aggregates."""
    return {name: aggregate for _, _, name, aggregate, _ in _read_results(paths)}


def load_results(paths: Iterable[str | Path], *, frames: Mapping[str, int] | None = None) -> dict[str, DimensionResult]:
    """Merge VBench result files (one or several) into ``{dimension: DimensionResult}``."""
    if frames is not None and not isinstance(frames, Mapping):
        raise MiraiError(f"frames must map video file names to frame counts, got {type(frames).__name__}")
    return {
        name: dimension_from_entries(name, aggregate, entries, frames=frames)
        for _, _, name, aggregate, entries in _read_results(paths)
    }
