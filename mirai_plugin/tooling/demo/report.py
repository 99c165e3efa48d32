"""The demo's numbers: the paired bootstrap of the primary metric, secondary metrics, a table, a verdict, a figure."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from mirai_plugin.tooling.eval.bootstrap import paired_row
from mirai_plugin.tooling.eval.results import DimensionResult

ARMS = ("baseline", "foresight", "control")
LABELS = {"start": "start (pretrained)", "baseline": "baseline (DMD)", "foresight": "+ foresight",
          "control": "+ foresight, target on the truth"}
COLOURS = {"start": (150, 150, 150), "baseline": (60, 60, 60), "foresight": (214, 96, 28), "control": (40, 110, 200)}
PER_VIDEO = ("identity_error", "psnr_beyond_horizon", "subject_consistency", "background_consistency")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_bootstrap(baseline: list[float], candidate: list[float], *, replicates: int, seed: int,
                     level: float) -> dict[str, float]:
    """``mirai_plugin.tooling.eval``'s paired bootstrap on one per-video metric: the videos (the prompts there)
    are resampled with replacement, the same draw for both arms, each replicate re-aggregated (a mean
    here), and the percentile CI taken of the difference ``candidate - baseline``."""
    units = tuple(str(i) for i in range(len(baseline)))
    ones = torch.ones(len(units), dtype=torch.float64)
    b = DimensionResult("metric", 0.0, units, torch.tensor(baseline, dtype=torch.float64), ones, len(units))
    c = DimensionResult("metric", 0.0, units, torch.tensor(candidate, dtype=torch.float64), ones, len(units))
    draw = torch.randint(len(units), (replicates, len(units)), generator=torch.Generator().manual_seed(seed))
    replicate = {
        name: r.numerator[draw].sum(dim=1) / r.denominator[draw].sum(dim=1) for name, r in (("b", b), ("c", c))
    }
    row = paired_row("metric", b.score, c.score, replicate["c"] - replicate["b"], level)
    # `paired_row` reports fractions in percent; these values are already in their own unit.
    return {"baseline": row.baseline / 100, "candidate": row.candidate / 100, "difference": row.difference / 100,
            "standard_error": row.standard_error / 100, "low": row.low / 100, "high": row.high / 100,
            "videos": len(units), "replicates": replicates, "level": level}


def summarise(results: list[dict], *, replicates: int, seed: int, level: float) -> dict:
    """Per arm: per-seed values and pooled per-video lists; the primary metric's paired CIs against the baseline."""
    seeds = sorted({r["seed"] for r in results})
    by = {(r["arm"], r["seed"]): r for r in results}
    arms = [a for a in ("start", *ARMS) if all((a, s) in by for s in seeds)]
    pooled = {a: {m: [x for s in seeds for x in by[a, s][m]] for m in PER_VIDEO} for a in arms}
    per_seed = {a: {
        **{m: [statistics.fmean(by[a, s][m]) for s in seeds] for m in PER_VIDEO},
        "probe_psnr": [by[a, s]["probe_psnr"] for s in seeds],
        "cycle_seconds": [_median(by[a, s]["train"]["cycle_seconds"]) for s in seeds] if a != "start" else [],
        "gradient_ratio": [by[a, s]["train"]["gradient"]["ratio"] for s in seeds] if a in ("foresight", "control")
        else [],
        "gradient_cosine": [by[a, s]["train"]["gradient"]["cosine"] for s in seeds] if a in ("foresight", "control")
        else [],
    } for a in arms}
    primary = {a: paired_bootstrap(pooled["baseline"]["identity_error"], pooled[a]["identity_error"],
                                   replicates=replicates, seed=seed, level=level) for a in arms if a != "baseline"}
    secondary = {a: {m: paired_bootstrap(pooled["baseline"][m], pooled[a][m], replicates=replicates, seed=seed,
                                         level=level) for m in PER_VIDEO[1:]} for a in arms if a != "baseline"}
    truth = {m: statistics.fmean(by["baseline", s][f"{m}_truth"] for s in seeds)
             for m in ("subject_consistency", "background_consistency")}
    psnr_curves = {a: [statistics.fmean(v) for v in zip(*(by[a, s]["psnr_per_segment"] for s in seeds))] for a in arms}
    return {"seeds": seeds, "arms": arms, "per_seed": per_seed, "primary": primary, "secondary": secondary,
            "truth": truth, "psnr_per_segment": psnr_curves,
            "means": {a: {m: statistics.fmean(pooled[a][m]) for m in PER_VIDEO} for a in arms}}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _direction(ci: dict, lower_is_better: bool = True) -> str:
    if ci["high"] < 0:
        return "lower" + (" (better)" if lower_is_better else " (worse)")
    if ci["low"] > 0:
        return "higher" + (" (worse)" if lower_is_better else " (better)")
    return "no detectable difference (the CI includes 0)"


def verdict(summary: dict) -> str:
    """Names the primary metric's CI for each arm against the baseline, then what the pair of results means under
    the registered decision rules: an arm differs from the baseline when its CI excludes 0."""
    lines, differs = [], {}
    for arm in ("foresight", "control"):
        if arm not in summary["primary"]:
            continue
        ci = summary["primary"][arm]
        differs[arm] = ci["high"] < 0 or ci["low"] > 0
        lines.append(
            f"{LABELS[arm]} vs baseline: reappearance colour error {ci['difference']:+.2f} points "
            f"[{ci['low']:+.2f}, {ci['high']:+.2f}] ({100 * ci['level']:.0f}% CI, {ci['videos']} paired videos, "
            f"{len(summary['seeds'])} seeds): {_direction(ci)}"
        )
    if {"foresight", "control"} <= set(differs):
        moved = {arm: "lowered" if summary["primary"][arm]["high"] < 0 else "raised" for arm in differs}
        if differs["foresight"]:
            lines.append(f"=> foresight on the student's own rollouts {moved['foresight']} the reappearance error at "
                         "this scale" + ("" if differs["control"] else
                                         " (the positive control did not move it)"))
        elif differs["control"]:
            lines.append(f"=> the metric detects an effect when the target carries the true future (the positive "
                         f"control {moved['control']} the error), but the target computed on the student's own "
                         "rollouts did not produce one: no effect of the term on the student's own rollouts, at "
                         "this scale")
        else:
            lines.append("=> not even the positive control moved the primary metric: at this scale the demo cannot "
                         "detect an effect of the term, so this run says nothing either way about the method")
    return "\n".join(lines)


def table(summary: dict) -> str:
    arms = summary["arms"]
    rows = [("metric", *(LABELS[a] for a in arms))]

    def add(name: str, cell) -> None:
        rows.append((name, *(cell(a) for a in arms)))

    def vs_baseline(a: str, ci: dict, digits: int) -> str:
        if a == "baseline":
            return f"{ci['baseline']:.{digits}f}"
        return (f"{ci['candidate']:.{digits}f} ({ci['difference']:+.{digits}f} "
                f"[{ci['low']:+.{digits}f}, {ci['high']:+.{digits}f}])")

    add("reappearance colour error, % (primary; diff vs baseline [95% CI])",
        lambda a: vs_baseline(
            a, summary["primary"][a] if a != "baseline" else next(iter(summary["primary"].values())), 2))
    add("  per seed", lambda a: " ".join(f"{v:.2f}" for v in summary["per_seed"][a]["identity_error"]))
    add("probe PSNR, hidden segment -> reappearance (dB, mean ± sd over seeds)",
        lambda a: "{:.2f} ± {:.2f}".format(*mean_std(summary["per_seed"][a]["probe_psnr"])))
    for metric, name, digits in (("psnr_beyond_horizon", "rollout PSNR beyond the training horizon (dB)", 2),
                                 ("subject_consistency", "subject consistency beyond the horizon", 4),
                                 ("background_consistency", "background consistency beyond the horizon", 4)):
        add(name, lambda a, m=metric, d=digits: vs_baseline(
            a, summary["secondary"][a][m] if a != "baseline" else next(iter(summary["secondary"].values()))[m], d))
    add("seconds per DMD cycle (1 generator + 5 critic steps)",
        lambda a: f"{statistics.fmean(summary['per_seed'][a]['cycle_seconds']):.3f}" if a != "start" else "-")
    add("step-0 |grad term| / |grad DMD| on the student (per seed)",
        lambda a: " ".join(f"{v:.2f}" for v in summary["per_seed"][a]["gradient_ratio"]) or "-")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------ figure


def figure(summary: dict, gate: dict, path: Path, *, train_segments: int) -> None:
    """Six panels: the primary metric's CIs against the baseline, its per-seed values, the student probe next
    to the gate's readouts, rollout PSNR per segment, consistency beyond the horizon, and cost."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = 1320, 800
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = load_font(ImageFont, 14), load_font(ImageFont, 12)
    arms = summary["arms"]
    per_seed, means = summary["per_seed"], summary["means"]
    cell_w, cell_h = width // 3, (height - 90) // 2
    boxes = [(c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h) for r in range(2) for c in range(3)]

    def point(arm: str, mean: float, low: float | None = None, high: float | None = None, dots=()) -> tuple:
        return COLOURS.get(arm, arm), mean, low, high, list(dots)

    primary = summary["primary"]
    _groups(draw, boxes[0], "reappearance colour error minus the baseline's (points, 95% CI)",
            [("vs baseline", [point(a, primary[a]["difference"], primary[a]["low"], primary[a]["high"])
                              for a in arms if a in primary])], font, small, zero=True)
    _groups(draw, boxes[1], "reappearance colour error (%): mean, per-seed dots",
            [("", [point(a, means[a]["identity_error"], dots=per_seed[a]["identity_error"]) for a in arms])],
            font, small)
    _groups(draw, boxes[2], "probe PSNR to the reappearance segment (dB)",
            [("students' state, hidden segment", [point(a, *_spread(per_seed[a]["probe_psnr"])) for a in arms]),
             ("gate: encoder vs pixels", [point(GATE_FEATURES, gate["hidden"]["features"]),
                                          point(GATE_PIXELS, gate["hidden"]["pixels"])])], font, small)
    _lines(draw, boxes[3], "rollout PSNR per generated segment (dB)", {a: summary["psnr_per_segment"][a] for a in arms},
           train_segments - 1, font, small)
    _groups(draw, boxes[4], "consistency beyond the training horizon",
            [(name, [point(a, means[a][metric]) for a in arms] + [point(TRUTH, summary["truth"][metric])])
             for metric, name in (("subject_consistency", "subject"), ("background_consistency", "background"))],
            font, small)
    _groups(draw, boxes[5], "seconds per DMD cycle (1 generator + 5 critic steps)",
            [("", [point(a, *_spread(per_seed[a]["cycle_seconds"])) for a in arms if a != "start"])], font, small)

    legend = [(LABELS[a], COLOURS[a]) for a in arms] + [("true videos", TRUTH),
                                                       ("gate: encoder features", GATE_FEATURES),
                                                       ("gate: pixels", GATE_PIXELS)]
    x = 14
    for label, colour in legend:
        draw.ellipse((x, height - 78, x + 10, height - 68), fill=colour)
        draw.text((x + 15, height - 81), label, fill="black", font=small)
        x += 30 + 7 * len(label)
    ratios = "; ".join(f"{LABELS[a]}: {' '.join(f'{v:.2f}' for v in per_seed[a]['gradient_ratio'])}"
                       for a in ("foresight", "control") if per_seed.get(a, {}).get("gradient_ratio"))
    draw.text((14, height - 56), f"{len(summary['seeds'])} seeds, {primary[next(iter(primary))]['videos']} paired "
              f"videos. Gate (hidden -> reappearance): features {gate['hidden']['features']:.2f} dB vs pixels "
              f"{gate['hidden']['pixels']:.2f} dB.", fill="black", font=small)
    draw.text((14, height - 38), f"Step-0 |grad of the term| / |grad of DMD| on the student, per seed: {ratios}",
              fill="black", font=small)
    image.save(path)


TRUTH, GATE_FEATURES, GATE_PIXELS = (0, 150, 0), (120, 0, 120), (190, 140, 190)


def _spread(values: list[float]) -> tuple[float, float, float]:
    mean, std = mean_std(values)
    return mean, mean - std, mean + std


def load_font(ImageFont, size: int):  # the module passed in: image_report.py shares this helper
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


def _axis(draw, plot, low: float, high: float, small) -> None:
    draw.rectangle(plot, outline="black")
    for k in range(5):
        y = low + (high - low) * k / 4
        py = plot[3] - (y - low) / (high - low) * (plot[3] - plot[1])
        draw.line((plot[0] - 4, py, plot[0], py), fill="black")
        label = f"{y:.3f}" if high - low < 0.5 else f"{y:.2f}" if high - low < 5 else f"{y:.1f}"
        draw.text((plot[0] - 52, py - 7), label, fill="black", font=small)


def _range(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    pad = (high - low) * 0.12 or max(abs(high) * 0.05, 1e-3)
    return low - pad, high + pad


def _groups(draw, box, title: str, groups: list[tuple[str, list[tuple]]], font, small, *, zero: bool = False) -> None:
    """Groups of points ``(colour, mean, low, high, dots)``, a whisker where ``low``/``high`` are given."""
    left, top, right, bottom = box
    draw.text((left + 14, top + 8), title, fill="black", font=font)
    plot = (left + 66, top + 34, right - 16, bottom - 40)
    values = [v for _, items in groups for _, m, lo, hi, dots in items for v in (m, lo, hi, *dots) if v is not None]
    low, high = _range(values + ([0.0] if zero else []))
    _axis(draw, plot, low, high, small)

    def y_of(v: float) -> float:
        return plot[3] - (v - low) / (high - low) * (plot[3] - plot[1])

    if zero:
        draw.line((plot[0], y_of(0.0), plot[2], y_of(0.0)), fill=(160, 160, 160), width=1)
    slots = sum(len(items) for _, items in groups) + len(groups) - 1
    step, slot = (plot[2] - plot[0]) / max(1, slots), 0
    for label, items in groups:
        first = slot
        for colour, mean, lo, hi, dots in items:
            x = plot[0] + step * (slot + 0.5)
            if lo is not None and hi is not None:
                draw.line((x, y_of(lo), x, y_of(hi)), fill=colour, width=3)
                for end in (lo, hi):
                    draw.line((x - 6, y_of(end), x + 6, y_of(end)), fill=colour, width=2)
            for v in dots:
                draw.ellipse((x + 9, y_of(v) - 3, x + 15, y_of(v) + 3), outline=colour, width=2)
            draw.ellipse((x - 5, y_of(mean) - 5, x + 5, y_of(mean) + 5), fill=colour)
            slot += 1
        if label:
            centre = plot[0] + step * (first + slot) / 2
            draw.text((centre - 3.2 * len(label), plot[3] + 6), label, fill="black", font=small)
        slot += 1


def _lines(draw, box, title: str, series: dict[str, list[float]], horizon: int, font, small) -> None:
    left, top, right, bottom = box
    draw.text((left + 14, top + 8), title, fill="black", font=font)
    plot = (left + 66, top + 34, right - 16, bottom - 40)
    low, high = _range([v for vs in series.values() for v in vs])
    _axis(draw, plot, low, high, small)
    count = max(len(vs) for vs in series.values())

    def x_of(k: float) -> float:
        return plot[0] + (plot[2] - plot[0]) * (k + 0.5) / count

    edge = x_of(horizon - 0.5)  # after the last generated segment of a training rollout
    draw.line((edge, plot[1], edge, plot[3]), fill=(160, 160, 160), width=1)
    draw.text((edge + 4, plot[1] + 4), "training horizon", fill=(110, 110, 110), font=small)
    for arm, values in series.items():
        xy = [(x_of(k), plot[3] - (v - low) / (high - low) * (plot[3] - plot[1])) for k, v in enumerate(values)]
        if len(xy) > 1:
            draw.line(xy, fill=COLOURS[arm], width=2)
    draw.text((plot[0] + 4, plot[3] + 6), f"generated segments 1-{count} of a rollout (3 frames each)", fill="black",
              font=small)
