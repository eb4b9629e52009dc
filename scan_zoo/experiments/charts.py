"""The benchmarks' figures, drawn with Pillow: grouped transfer bars and the K-ablation panels."""

from __future__ import annotations

import math
from typing import Sequence

from PIL import Image, ImageDraw

from scan_zoo.eval import figures
from scan_zoo.eval.transfer import TASKS
from scan_zoo.experiments.bench_runs import LABELS

COLOURS = {
    "supervised": (120, 120, 120),
    "moco": (66, 133, 244),
    "supcon": (244, 160, 0),
    "scan": (219, 68, 55),
    "dsc": (15, 157, 88),
}
TASK_COLOURS = [(66, 133, 244), (219, 68, 55), (15, 157, 88), (171, 71, 188)]


def _nice_step(span: float, target_ticks: int = 5) -> float:
    raw = max(span, 1e-9) / target_ticks
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def transfer_chart(summary: dict, methods: Sequence[str], title: str = "") -> "Image.Image":
    """Grouped bars: one group per task, one bar per method (mean), whiskers +-1 std, value above each bar.

    One y axis in percent from min(0, lowest whisker) to max(100, highest whisker): bars start at 0.
    """
    bar, gap, group_gap, left, right, top, bottom, plot_h = 44, 4, 36, 56, 20, 64, 48, 300
    n_m = len(methods)
    group_w = n_m * bar + (n_m - 1) * gap
    font, small = figures.font(12), figures.font(10)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_w = sum(34 + probe.textlength(LABELS.get(m, m), font=small) for m in methods)
    width = int(
        max(
            left + len(TASKS) * group_w + (len(TASKS) + 1) * group_gap + right,
            left + max(probe.textlength(title, font=font), legend_w) + right,
        )
    )
    height = top + plot_h + bottom
    lows, highs = [0.0], [100.0]
    for key, _, _ in TASKS:
        for c in summary.get(key, {}).values():
            lows.append(c["mean"] - (c["std"] or 0))
            highs.append(c["mean"] + (c["std"] or 0))
    step = _nice_step(max(highs) - min(lows))
    lo, hi = math.floor(min(lows) / step) * step, math.ceil(max(highs) / step) * step
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)

    def y(v: float) -> float:
        return top + plot_h * (hi - v) / (hi - lo)

    d.text((left, 8), title, fill="black", font=font)
    x = left  # legend
    for m in methods:
        d.rectangle((x, 30, x + 12, 42), fill=COLOURS.get(m, (0, 0, 0)))
        d.text((x + 16, 29), LABELS.get(m, m), fill="black", font=small)
        x += 16 + int(d.textlength(LABELS.get(m, m), font=small)) + 18
    v = lo
    while v <= hi + 1e-9:  # grid and y ticks
        d.line((left, y(v), width - right, y(v)), fill=(225, 225, 225) if v else (0, 0, 0))
        label = f"{v:g}"
        d.text((left - 6 - d.textlength(label, font=small), y(v) - 6), label, fill="black", font=small)
        v += step
    d.line((left, top, left, top + plot_h), fill="black")
    d.text((4, top - 14), "%", fill="black", font=small)
    for t, (key, task, metric) in enumerate(TASKS):
        gx = left + group_gap + t * (group_w + group_gap)
        for i, m in enumerate(methods):
            c = summary.get(key, {}).get(m)
            if not c:
                continue
            x0 = gx + i * (bar + gap)
            d.rectangle(
                (x0, min(y(c["mean"]), y(0)), x0 + bar, max(y(c["mean"]), y(0))), fill=COLOURS.get(m, (0, 0, 0))
            )
            if c["std"] is not None:
                xc = x0 + bar / 2
                d.line((xc, y(c["mean"] - c["std"]), xc, y(c["mean"] + c["std"])), fill="black", width=1)
                for yy in (y(c["mean"] - c["std"]), y(c["mean"] + c["std"])):
                    d.line((xc - 5, yy, xc + 5, yy), fill="black")
            label = f"{c['mean']:.1f}"
            top_y = y(c["mean"] + (c["std"] or 0)) if c["mean"] >= 0 else y(0)
            d.text((x0 + (bar - d.textlength(label, font=small)) / 2, top_y - 13), label, fill="black", font=small)
        for j, line in enumerate((task, metric)):
            d.text(
                (gx + (group_w - d.textlength(line, font=small)) / 2, top + plot_h + 8 + 13 * j),
                line,
                fill="black",
                font=small,
            )
    return img


def k_ablation_chart(result: dict) -> "Image.Image":
    """One panel per task: score against K (categorical axis, ``all`` last), MoCo (the start) dashed."""
    panel_w, panel_h, pad, left, top_title = 360, 230, 16, 50, 34
    cols, rows = 2, math.ceil(len(TASKS) / 2)
    width, height = cols * panel_w + pad, top_title + rows * panel_h + pad
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font, small = figures.font(12), figures.font(10)
    runs = result["runs"]
    moco = result.get("moco", {}).get("scores") or {}
    d.text(
        (pad, 8),
        f"SCAN K ablation on the digit scenes (seed {result['seed']}, {result['budget']['steps']} steps "
        f"each{', QUICK smoke run' if result.get('quick') else ''}); dashed: the MoCo start",
        fill="black",
        font=font,
    )
    for t, (key, task, metric) in enumerate(TASKS):
        px, py = (t % cols) * panel_w + pad, top_title + (t // cols) * panel_h
        x0, x1, y0, y1 = px + left, px + panel_w - pad, py + 22, py + panel_h - 40
        values = [r["scores"][key] for r in runs] + ([moco[key]] if key in moco else [])
        vlo, vhi = min(values), max(values)
        span = max(vhi - vlo, 0.5)
        step = _nice_step(span, 4)
        lo, hi = math.floor((vlo - 0.1 * span) / step) * step, math.ceil((vhi + 0.25 * span) / step) * step

        def y(v: float) -> float:
            return y1 - (y1 - y0) * (v - lo) / (hi - lo)

        d.text((px + left, py + 4), f"{task}: {metric}", fill="black", font=font)
        v = lo
        while v <= hi + 1e-9:
            d.line((x0, y(v), x1, y(v)), fill=(225, 225, 225))
            label = f"{v:g}"
            d.text((x0 - 6 - d.textlength(label, font=small), y(v) - 6), label, fill="black", font=small)
            v += step
        d.rectangle((x0, y0, x1, y1), outline="black")
        n = len(runs)
        xs = [x0 + (x1 - x0) * (i + 0.5) / n for i in range(n)]
        if key in moco:
            yy, xx = y(moco[key]), x0
            while xx < x1:
                d.line((xx, yy, min(xx + 6, x1), yy), fill=(90, 90, 90))
                xx += 10
        pts = [(xs[i], y(r["scores"][key])) for i, r in enumerate(runs)]
        colour = TASK_COLOURS[t % len(TASK_COLOURS)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for (xx, yy), r in zip(pts, runs):
            d.ellipse((xx - 4, yy - 4, xx + 4, yy + 4), fill=colour)
            label = f"{r['scores'][key]:.1f}"
            d.text((xx - d.textlength(label, font=small) / 2, yy - 17), label, fill="black", font=small)
            d.text((xx - d.textlength(r["k"], font=small) / 2, y1 + 5), r["k"], fill="black", font=small)
        d.text(((x0 + x1) / 2 - 8, y1 + 19), "K", fill="black", font=small)
    return img
