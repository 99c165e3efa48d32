"""Evaluation the way the paper does it: VBench scores, consistency formulas, paired bootstrap.

Nothing here imports ``vbench``; only ``runner.run_vbench`` needs it, in its own environment.
"""

from mirai_plugin.tooling.eval.bootstrap import Row, compare
from mirai_plugin.tooling.eval.consistency import (
    background_consistency,
    feature_consistency,
    subject_consistency,
    temporal_flickering,
)
from mirai_plugin.tooling.eval.results import DimensionResult, load_aggregates, load_results, prompt_of
from mirai_plugin.tooling.eval.vbench_score import DIMENSIONS, QUALITY, SEMANTIC, final_scores, scores_from_percent

__all__ = [
    "DIMENSIONS",
    "QUALITY",
    "SEMANTIC",
    "DimensionResult",
    "Row",
    "background_consistency",
    "compare",
    "feature_consistency",
    "final_scores",
    "load_aggregates",
    "load_results",
    "prompt_of",
    "scores_from_percent",
    "subject_consistency",
    "temporal_flickering",
]
