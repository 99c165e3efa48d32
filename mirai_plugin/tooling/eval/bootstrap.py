"""Paired prompt-level bootstrap of the difference between two methods' VBench scores.

For every dimension, prompts are resampled with replacement — the same indices for
both methods, within that dimension's own prompt list — and each replicate is
re-aggregated as VBench does (ratio of sums) and then weighted into Quality,
Semantic and Total. Reported per row: both point estimates, their difference, the
standard error of the difference over replicates and its percentile confidence
interval; a CI that excludes zero marks a significant difference. All in percent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from mirai_plugin.checks import Rule, check
from mirai_plugin.errors import MiraiError
from mirai_plugin.tooling.eval.results import DimensionResult
from mirai_plugin.tooling.eval.vbench_score import DIMENSIONS, check_dimensions, final_scores


@dataclass(frozen=True)
class Row:
    name: str
    baseline: float
    candidate: float
    difference: float
    standard_error: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0


def compare(
    baseline: Mapping[str, DimensionResult],
    candidate: Mapping[str, DimensionResult],
    *,
    replicates: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> list[Row]:
    """Rows for the 16 dimensions, then Quality, Semantic and Total (percent)."""
    for name, results in (("baseline", baseline), ("candidate", candidate)):
        if not isinstance(results, Mapping) or not all(isinstance(r, DimensionResult) for r in results.values()):
            raise MiraiError(f"{name} must be what load_results returned ({{dimension: DimensionResult}}), "
                             f"got {type(results).__name__}")
    check_dimensions(baseline, where=" in the baseline results")
    check_dimensions(candidate, where=" in the candidate results")
    replicates = check("replicates", replicates, Rule("int", minimum=2, fix="10000 is the usual count"))
    level = check("level", level, Rule("number", above=0, below=1, fix="0.95 for a 95% interval"))
    seed = check("seed", seed, Rule("int", minimum=0))

    points_b, points_c, reps_b, reps_c = {}, {}, {}, {}
    for index, name in enumerate(DIMENSIONS):
        b, c = baseline[name], candidate[name]
        order = _paired_order(name, b, c)
        g = torch.Generator().manual_seed(seed * 1_000 + index)  # each dimension its own prompt draw
        draw = torch.randint(len(b.prompts), (replicates, len(b.prompts)), generator=g)
        for result, sel, points, reps in ((b, None, points_b, reps_b), (c, order, points_c, reps_c)):
            numerator = result.numerator if sel is None else result.numerator[sel]
            denominator = result.denominator if sel is None else result.denominator[sel]
            points[name] = (numerator.sum() / denominator.sum()).item()
            reps[name] = numerator[draw].sum(dim=1) / denominator[draw].sum(dim=1)  # (replicates)

    rows = [paired_row(name, points_b[name], points_c[name], reps_c[name] - reps_b[name], level) for name in DIMENSIONS]
    totals_b, totals_c = final_scores(points_b), final_scores(points_c)
    reps_totals_b, reps_totals_c = final_scores(reps_b), final_scores(reps_c)
    for part in ("quality", "semantic", "total"):
        rows.append(paired_row(part, totals_b[part], totals_c[part], reps_totals_c[part] - reps_totals_b[part], level))
    return rows


def _paired_order(name: str, b: DimensionResult, c: DimensionResult) -> torch.Tensor:
    position = {p: i for i, p in enumerate(c.prompts)}
    only_b = [p for p in b.prompts if p not in position]
    only_c = sorted(set(c.prompts) - set(b.prompts))
    if only_b or only_c:
        raise MiraiError(
            f"{name}: the two methods were evaluated on different prompts (only baseline: {only_b[:3]}, "
            f"only candidate: {only_c[:3]}); a paired bootstrap needs the same prompt list"
        )
    return torch.tensor([position[p] for p in b.prompts])


def paired_row(name: str, baseline: float, candidate: float, differences: torch.Tensor, level: float) -> Row:
    tail = (1 - level) / 2
    low, high = torch.quantile(differences, torch.tensor([tail, 1 - tail], dtype=differences.dtype)).tolist()
    return Row(
        name,
        100 * baseline,
        100 * candidate,
        100 * (candidate - baseline),
        100 * differences.std().item(),
        100 * low,
        100 * high,
    )
