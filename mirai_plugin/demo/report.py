"""Aggregating the demo's per-seed results: a terminal table, a verdict, results.json and a figure."""

from __future__ import annotations

import statistics
from pathlib import Path

VARIANTS = ("baseline", "foresight")
COLOURS = {"baseline": (90, 90, 90), "foresight": (214, 96, 28)}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(per_seed: dict[str, list[dict]], *, layer: int, segment_frames: int, train_frames: int) -> dict:
    """Headline metrics per variant (lists over seeds) and a paired verdict per metric."""
    def collect(fn):
        return {variant: [fn(r) for r in per_seed[variant]] for variant in VARIANTS}

    longest = max(int(m) for m in per_seed["baseline"][0]["consistency"]["subject"])
    beyond = train_frames // segment_frames - 1  # generated segments inside the training horizon
    metrics = {
        f"probe PSNR, layer {layer}, mean of horizons 1-3 (dB)": collect(
            lambda r: statistics.fmean(v["psnr"] for v in r["probe"][str(layer)].values())
        ),
        f"subject consistency, {longest} frames": collect(lambda r: r["consistency"]["subject"][str(longest)]),
        f"background consistency, {longest} frames": collect(lambda r: r["consistency"]["background"][str(longest)]),
        "rollout PSNR beyond the training horizon (dB)": collect(
            lambda r: statistics.fmean(r["rollout_psnr"][beyond:])
        ),
        "training seconds per step": collect(lambda r: r["train_step_seconds"]),
        "inference seconds per segment": collect(lambda r: r["inference_segment_seconds"]),
    }
    verdicts = {}
    for name, values in metrics.items():
        if "seconds" in name:
            continue
        diffs = [f - b for b, f in zip(values["baseline"], values["foresight"])]
        if all(d > 0 for d in diffs):
            verdicts[name] = "better with foresight (every seed)"
        elif all(d < 0 for d in diffs):
            verdicts[name] = "worse with foresight (every seed)"
        else:
            verdicts[name] = "no consistent difference"
    return {"metrics": metrics, "verdicts": verdicts}


def overall_verdict(summary: dict) -> str:
    verdicts = summary["verdicts"].values()
    better = sum(v.startswith("better") for v in verdicts)
    worse = sum(v.startswith("worse") for v in verdicts)
    if better and not worse:
        return f"foresight helped: {better} of {len(verdicts)} quality metrics better on every seed, none worse"
    if worse and not better:
        return f"foresight hurt: {worse} of {len(verdicts)} quality metrics worse on every seed, none better"
    if not better and not worse:
        return "no difference at this scale: no quality metric moved consistently across seeds"
    return f"mixed: {better} metric(s) better and {worse} worse on every seed"


def table(summary: dict) -> str:
    rows = [("metric", "baseline", "+ foresight", "verdict")]
    for name, values in summary["metrics"].items():
        cells = []
        for variant in VARIANTS:
            mean, std = mean_std(values[variant])
            cells.append(f"{mean:.4f} ± {std:.4f}" if mean < 1 else f"{mean:.2f} ± {std:.2f}")
        rows.append((name, *cells, summary["verdicts"].get(name, "")))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------ figure


def figure(per_seed: dict[str, list[dict]], path: Path, *, layer: int) -> None:
    """Three panels: probe PSNR vs horizon, subject and background consistency vs rollout length."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (1200, 420), "white")
    draw = ImageDraw.Draw(image)
    font = _font(ImageFont, 14)
    small = _font(ImageFont, 12)
    horizons = sorted(per_seed["baseline"][0]["probe"][str(layer)], key=int)
    lengths = sorted(per_seed["baseline"][0]["consistency"]["subject"], key=int)
    panels = [
        (f"probe PSNR (dB), layer {layer}", "horizon (segments ahead)", horizons,
         lambda r, x: r["probe"][str(layer)][x]["psnr"]),
        ("subject consistency", "rollout length (frames)", lengths, lambda r, x: r["consistency"]["subject"][x]),
        ("background consistency", "rollout length (frames)", lengths, lambda r, x: r["consistency"]["background"][x]),
    ]
    for i, (title, xlabel, xs, value) in enumerate(panels):
        series = {
            v: [mean_std([value(r, x) for r in per_seed[v]]) for x in xs] for v in VARIANTS
        }
        _panel(draw, (20 + i * 395, 20, 395 + i * 395, 360), title, xlabel, xs, series, font, small)
    for j, variant in enumerate(VARIANTS):
        x = 450 + j * 200
        draw.line((x, 395, x + 30, 395), fill=COLOURS[variant], width=3)
        draw.text((x + 38, 387), "baseline" if variant == "baseline" else "+ foresight", fill="black", font=font)
    draw.text((20, 387), f"mean ± std over {len(per_seed['baseline'])} seeds", fill="black", font=small)
    image.save(path)


def _font(ImageFont, size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


def _panel(draw, box, title, xlabel, xs, series, font, small) -> None:
    left, top, right, bottom = box
    plot = (left + 55, top + 30, right - 15, bottom - 40)
    draw.text((left + 55, top + 5), title, fill="black", font=font)
    draw.rectangle(plot, outline="black")
    values = [m + s * sign for points in series.values() for m, s in points for sign in (-1, 1)]
    low, high = min(values), max(values)
    pad = (high - low) * 0.15 or 1e-3
    low, high = low - pad, high + pad

    def to_xy(i: int, y: float) -> tuple[float, float]:
        x = plot[0] + (i + 0.5) / len(xs) * (plot[2] - plot[0])
        return x, plot[3] - (y - low) / (high - low) * (plot[3] - plot[1])

    for k in range(5):
        y = low + (high - low) * k / 4
        _, py = to_xy(0, y)
        draw.line((plot[0] - 4, py, plot[0], py), fill="black")
        draw.text((left + 2, py - 7), f"{y:.3f}" if high - low < 1 else f"{y:.1f}", fill="black", font=small)
    for i, x in enumerate(xs):
        px, _ = to_xy(i, low)
        draw.text((px - 6, plot[3] + 5), str(x), fill="black", font=small)
    draw.text((plot[0] + 60, plot[3] + 22), xlabel, fill="black", font=small)
    for offset, (variant, points) in zip((-4, 4), series.items()):
        xy = [to_xy(i, m) for i, (m, _) in enumerate(points)]
        xy = [(x + offset, y) for x, y in xy]
        if len(xy) > 1:
            draw.line(xy, fill=COLOURS[variant], width=3)
        for (x, y), (m, s) in zip(xy, points):
            _, y_low = to_xy(0, m - s)
            _, y_high = to_xy(0, m + s)
            draw.line((x, y_low, x, y_high), fill=COLOURS[variant], width=2)
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=COLOURS[variant])
