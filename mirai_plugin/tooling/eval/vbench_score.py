"""VBench's final score: per-dimension normalisation, dimension weights, Quality / Semantic / Total.

The numbers are VBench's own (``Vchitect/VBench``, ``scripts/constant.py``, used by
``scripts/cal_final_score.py``): ``normalised = (score - min) / (max - min) * weight``;
Quality and Semantic are the weight-normalised sums over their dimensions; Total is
``(4 * Quality + 1 * Semantic) / 5``. Scores are fractions (VBench's result files);
tables usually show them in percent.

The arithmetic works on floats and on tensors alike (the bootstrap scores 10,000
replicates at once).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mirai_plugin.errors import MiraiError

QUALITY = (
    "subject_consistency",
    "background_consistency",
    "temporal_flickering",
    "motion_smoothness",
    "aesthetic_quality",
    "imaging_quality",
    "dynamic_degree",
)
SEMANTIC = (
    "object_class",
    "multiple_objects",
    "human_action",
    "color",
    "spatial_relationship",
    "scene",
    "appearance_style",
    "temporal_style",
    "overall_consistency",
)
DIMENSIONS = QUALITY + SEMANTIC

# (min, max) of VBench's normalisation
NORMALISATION = {
    "subject_consistency": (0.1462, 1.0),
    "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0),
    "motion_smoothness": (0.706, 0.9975),
    "dynamic_degree": (0.0, 1.0),
    "aesthetic_quality": (0.0, 1.0),
    "imaging_quality": (0.0, 1.0),
    "object_class": (0.0, 1.0),
    "multiple_objects": (0.0, 1.0),
    "human_action": (0.0, 1.0),
    "color": (0.0, 1.0),
    "spatial_relationship": (0.0, 1.0),
    "scene": (0.0, 0.8222),
    "appearance_style": (0.0009, 0.2855),
    "temporal_style": (0.0, 0.364),
    "overall_consistency": (0.0, 0.364),
}
WEIGHT = {name: (0.5 if name == "dynamic_degree" else 1.0) for name in DIMENSIONS}
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4.0, 1.0


def canonical(name: str) -> str:
    """``"subject consistency"`` / ``"Subject_Consistency"`` -> ``"subject_consistency"``."""
    return name.strip().lower().replace(" ", "_")


def canonical_scores(scores: Mapping[Any, Any], *, where: str = "") -> dict[Any, Any]:
    """``scores`` keyed by canonical names; one dimension under two spellings is refused, naming both
    (keeping either value would be a silent choice)."""
    out: dict[Any, Any] = {}
    spelled: dict[Any, Any] = {}
    for key, value in scores.items():
        name = canonical(key) if isinstance(key, str) else key
        if name in spelled:
            raise MiraiError(
                f"VBench dimension {name!r} appears twice{where}, as {spelled[name]!r} and {key!r}; keep one of them"
            )
        spelled[name], out[name] = key, value
    return out


def check_dimensions(names, *, where: str = "") -> None:
    names = set(names)
    missing = [d for d in DIMENSIONS if d not in names]
    unknown = sorted(names - set(DIMENSIONS))
    if unknown:
        raise MiraiError(f"unknown VBench dimensions{where}: {unknown}; the 16 are {list(DIMENSIONS)}")
    if missing:
        raise MiraiError(
            f"missing VBench dimensions{where}: {missing} (VBench's own script would score them as 0); "
            f"evaluate them or pass every result file"
        )


def final_scores(scores: Mapping[str, Any]) -> dict[str, Any]:
    """Quality, Semantic and Total (fractions) from the 16 dimension scores (fractions).

    >>> perfect = {d: NORMALISATION[d][1] for d in DIMENSIONS}
    >>> final_scores(perfect)["total"]
    1.0
    """
    if not isinstance(scores, Mapping):
        raise MiraiError(f"scores must map the 16 VBench dimensions to their scores, got {type(scores).__name__}")
    scores = canonical_scores(scores)
    check_dimensions(scores)
    normalised = {
        d: (scores[d] - NORMALISATION[d][0]) / (NORMALISATION[d][1] - NORMALISATION[d][0]) * WEIGHT[d]
        for d in DIMENSIONS
    }
    quality = sum(normalised[d] for d in QUALITY) / sum(WEIGHT[d] for d in QUALITY)
    semantic = sum(normalised[d] for d in SEMANTIC) / sum(WEIGHT[d] for d in SEMANTIC)
    total = (quality * QUALITY_WEIGHT + semantic * SEMANTIC_WEIGHT) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)
    return {"quality": quality, "semantic": semantic, "total": total, "normalised": normalised}


def check_score(name: str, value: Any, *, where: str = "", percent: bool = False) -> float:
    """A dimension's score: a finite number in [0, 1] (``percent``: [0, 100]), naming the dimension."""
    top = 100 if percent else 1
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not 0 <= value <= top):
        unit = "a percentage in [0, 100]" if percent else "a fraction in [0, 1]"
        raise MiraiError(
            f"{name}{where} must be {unit} (VBench's range), got {value!r}; "
            + ("a table lists the 16 dimensions in percent" if percent else "check the result file")
        )
    return float(value)


def scores_from_percent(table: Mapping[str, float]) -> dict[str, float]:
    """A table of the 16 dimensions in percent (as papers print them) -> fractions."""
    if not isinstance(table, Mapping):
        raise MiraiError(f"the table must map the 16 VBench dimensions to percentages, got {type(table).__name__}")
    scores = {}
    for name, value in canonical_scores(table, where=" in the table").items():
        scores[name] = check_score(name, value, where=" in the table", percent=True) / 100.0
    check_dimensions(scores, where=" in the table")
    if all(value <= 0.01 for value in scores.values()):
        raise MiraiError(
            "every score in the table is at most 1: it looks like fractions, and a table lists percentages "
            "(VBench's 0.8 is 80.0 here); multiply the values by 100, or pass the *_eval_results.json files"
        )
    return scores
