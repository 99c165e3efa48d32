"""The image demo's numbers: per-metric paired verdicts against the baseline, a table, a figure.

A metric counts as moved by an arm when, over seeds, the paired difference with the
baseline has the same sign on every seed *and* passes a two-sided paired t-test at 5 %
(|mean| > t * standard error, t = 4.30 for 3 seeds, 12.7 for 2) *and* exceeds the
metric's resolution (one validation interval for the step count, which is only
measured at those intervals): with so few seeds only a large, steady effect counts.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

BASELINE = "baseline"
# two-sided 5 % critical values of Student's t by degrees of freedom (seeds - 1); beyond 10, the df-10 value
T_CRITICAL = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}
COLOURS = {"baseline": (90, 90, 90), "mirai-e": (214, 96, 28), "mirai-i": (40, 110, 200)}

# name -> (key in a per-seed result, +1 when higher is better, -1 when lower is)
METRICS = {
    "structure coherence (fraction of samples obeying their rule)": ("coherence", +1),
    "final validation loss (nats/token)": ("final_val_loss", -1),
    "steps to reach the baseline's mid-training validation loss": ("steps_to_threshold", -1),
}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def steps_to_reach(steps: list[int], losses: list[float], threshold: float) -> int | None:
    """First evaluated step whose validation loss is at or below ``threshold`` (None: never).

    >>> steps_to_reach([0, 50, 100], [2.0, 1.2, 1.0], 1.2)
    50
    >>> steps_to_reach([0, 50], [2.0, 1.5], 1.0) is None
    True
    """
    return next((s for s, loss in zip(steps, losses) if loss <= threshold), None)


def paired_verdict(baseline: list[float], arm: list[float], sign: int, resolution: float = 0.0) -> str:
    """``better`` / ``worse`` / ``no clear difference`` for one metric (module docstring).

    >>> paired_verdict([0.5, 0.6, 0.55], [0.7, 0.8, 0.72], +1)
    'better'
    >>> paired_verdict([0.5, 0.6, 0.55], [0.7, 0.5, 0.72], +1)
    'no clear difference'
    """
    gains = [sign * (a - b) for b, a in zip(baseline, arm)]
    if len(gains) < 2:
        return "no clear difference"  # one seed: no spread to judge a difference by
    mean = statistics.fmean(gains)
    margin = max(T_CRITICAL[min(len(gains) - 1, 10)] * statistics.stdev(gains) / math.sqrt(len(gains)), resolution)
    if all(g > 0 for g in gains) and mean > margin:
        return "better"
    if all(g < 0 for g in gains) and -mean > margin:
        return "worse"
    return "no clear difference"


def arm_verdict(verdicts: dict[str, str]) -> str:
    better = [name for name, v in verdicts.items() if v == "better"]
    worse = [name for name, v in verdicts.items() if v == "worse"]
    if better and not worse:
        return f"helped ({len(better)} of {len(verdicts)} metrics better, none worse)"
    if worse and not better:
        return f"hurt ({len(worse)} of {len(verdicts)} metrics worse, none better)"
    if better and worse:
        return f"mixed ({len(better)} metric(s) better, {len(worse)} worse)"
    return "no clear difference (no metric moved steadily across seeds)"


def summarise(per_seed: dict[str, list[dict]], *, eval_every: int, steps: int) -> dict:
    """Adds ``steps_to_threshold`` to every per-seed result, then the metrics over seeds
    and a verdict for each Mirai arm against the baseline.

    The threshold of a seed is the baseline's validation loss at half training; a run
    that never reaches it counts as ``steps + eval_every`` (censored).
    """
    arms = list(per_seed)
    for i, base in enumerate(per_seed[BASELINE]):
        half = min(range(len(base["val_steps"])), key=lambda j: abs(base["val_steps"][j] - steps / 2))
        threshold = base["val_loss"][half]
        for arm in arms:
            result = per_seed[arm][i]
            reached = steps_to_reach(result["val_steps"], result["val_loss"], threshold)
            result["loss_threshold"] = threshold
            result["steps_to_threshold_reached"] = reached is not None
            result["steps_to_threshold"] = reached if reached is not None else steps + eval_every
    metrics = {name: {arm: [r[key] for r in per_seed[arm]] for arm in arms} for name, (key, _) in METRICS.items()}
    metrics["training seconds per step"] = {arm: [r["train_step_seconds"] for r in per_seed[arm]] for arm in arms}
    resolution = {name: eval_every if key == "steps_to_threshold" else 0.0 for name, (key, _) in METRICS.items()}
    verdicts = {
        arm: {name: paired_verdict(metrics[name][BASELINE], metrics[name][arm], sign, resolution[name])
              for name, (_, sign) in METRICS.items()}
        for arm in arms if arm != BASELINE
    }
    return {
        "metrics": metrics,
        "metric_verdicts": verdicts,
        "verdict": {arm: arm_verdict(v) for arm, v in verdicts.items()},
        "rule": "better/worse: same sign on every seed, a two-sided paired t-test at 5 % over seeds, "
                "and a mean difference beyond one validation interval for the step count",
    }


def table(summary: dict) -> str:
    metrics = summary["metrics"]
    arms = list(next(iter(metrics.values())))
    rows = [("metric (mean ± sd over seeds)", *arms)]
    for name, values in metrics.items():
        cells = []
        for arm in arms:
            mean, std = mean_std(values[arm])
            cell = f"{mean:.0f} ± {std:.0f}" if mean >= 10 else f"{mean:.3f} ± {std:.3f}"
            verdict = summary["metric_verdicts"].get(arm, {}).get(name)
            cells.append(cell + (f" ({verdict})" if verdict and verdict != "no clear difference" else ""))
        rows.append((name, *cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------ figure


def figure(per_seed: dict[str, list[dict]], samples: dict, path: Path, *, per_row: int = 8) -> None:
    """Left: validation loss over steps (mean over seeds). Right: the first seed's samples
    (``samples[arm] = (grids (n H W), labels (n,))``), one row per family, one block per
    arm, a red frame around samples breaking their rule."""
    from PIL import Image, ImageDraw, ImageFont

    from mirai_plugin.tooling.demo.image_world import FAMILIES, PALETTE, satisfies
    from mirai_plugin.tooling.demo.report import load_font

    arms, cell = list(per_seed), 5  # pixels per token
    side = 8 * cell + 4
    block_width = per_row * side
    width = 500 + len(arms) * (block_width + 20)
    image = Image.new("RGB", (width, max(320, 40 + len(FAMILIES) * (side + 6) + 30)), "white")
    draw = ImageDraw.Draw(image)
    font = load_font(ImageFont, 12)
    _loss_panel(draw, (10, 10, 400, 300), per_seed, font)
    for f, name in enumerate(FAMILIES):
        draw.text((415, 32 + f * (side + 6) + side // 2 - 6), name, fill="black", font=font)
    for a, arm in enumerate(arms):
        grids, labels = samples[arm]
        ok = satisfies(grids, labels)
        left = 500 + a * (block_width + 20)
        draw.text((left, 12), f"{arm} (red frame: rule broken)" if a == 0 else arm,
                  fill=COLOURS.get(arm, (0, 0, 0)), font=font)
        for f in range(len(FAMILIES)):
            for j, index in enumerate((labels == f).nonzero().flatten()[:per_row].tolist()):
                x0, y0 = left + j * side, 32 + f * (side + 6)
                draw.rectangle((x0, y0, x0 + side - 2, y0 + side - 2), outline="white" if ok[index] else (220, 0, 0))
                for r, row in enumerate(grids[index].tolist()):
                    for c, token in enumerate(row):
                        px, py = x0 + 2 + c * cell, y0 + 2 + r * cell
                        draw.rectangle((px, py, px + cell - 1, py + cell - 1), fill=PALETTE[token])
    image.save(path)


def _loss_panel(draw, box, per_seed: dict[str, list[dict]], font) -> None:
    left, top, right, bottom = box
    plot = (left + 45, top + 22, right - 10, bottom - 30)
    draw.text((plot[0], top + 2), "validation loss (nats/token), mean over seeds", fill="black", font=font)
    draw.rectangle(plot, outline="black")
    steps = per_seed[next(iter(per_seed))][0]["val_steps"]
    curves = {arm: [statistics.fmean(r["val_loss"][i] for r in runs) for i in range(len(steps))]
              for arm, runs in per_seed.items()}
    skip = max(1, len(steps) // 10)  # the first points (untrained model) would flatten the rest
    low = min(min(c[skip:]) for c in curves.values())
    high = max(max(c[skip:]) for c in curves.values())
    pad = (high - low) * 0.1 or 1e-3
    low, high = low - pad, high + pad

    def xy(i: int, value: float) -> tuple[float, float]:
        x = plot[0] + steps[i] / steps[-1] * (plot[2] - plot[0])
        y = plot[3] - (min(max(value, low), high) - low) / (high - low) * (plot[3] - plot[1])
        return x, y

    for k in range(5):
        value = low + (high - low) * k / 4
        draw.text((left, xy(0, value)[1] - 6), f"{value:.2f}", fill="black", font=font)
    draw.text((plot[0], plot[3] + 6), "0", fill="black", font=font)
    draw.text((plot[2] - 30, plot[3] + 6), f"{steps[-1]} steps", fill="black", font=font)
    for n, (arm, curve) in enumerate(curves.items()):
        draw.line([xy(i, v) for i, v in enumerate(curve) if i >= skip], fill=COLOURS.get(arm, (0, 0, 0)), width=2)
        draw.text((plot[2] - 80, plot[1] + 6 + 14 * n), arm, fill=COLOURS.get(arm, (0, 0, 0)), font=font)
