"""A bar chart of the ratios (median bar, min-max whisker, goal tick), drawn with PIL.

PIL rather than matplotlib: PIL is already a dependency, and one chart does not justify a new one.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from benchmarks.harness import Comparison, Result

WIDTH, ROW, LEFT, RIGHT, TOP = 960, 46, 320, 40, 56
GOOD, BAD, NEUTRAL, GOAL = (46, 139, 87), (200, 60, 50), (90, 110, 160), (20, 20, 20)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def plot_ratios(results: Sequence[Result], path: str | Path, title: str = "gpfm-engine vs PyTorch baselines") -> Path:
    """Draw one bar per comparison from 1x on a log2 axis (whisker min-max, tick = goal) and save."""
    rows = [r for r in results if isinstance(r, Comparison)]
    height = TOP + ROW * max(len(rows), 1) + 50
    img = Image.new("RGB", (WIDTH, height), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(15), _font(12)
    d.text((12, 12), title, fill="black", font=_font(18))

    values = [v for c in rows for v in (c.ratio_min, c.ratio_max, c.goal or 1.0) if v > 0 and math.isfinite(v)]
    lo = math.log2(min(values + [1.0]) / 1.25)
    hi = math.log2(max(values + [1.0]) * 1.25)

    def x_of(v: float) -> float:
        lv = max(lo, min(hi, math.log2(v))) if v > 0 and math.isfinite(v) else hi
        return LEFT + (lv - lo) / (hi - lo) * (WIDTH - LEFT - RIGHT)

    axis_y = TOP + ROW * max(len(rows), 1)
    for k in range(math.ceil(lo), math.floor(hi) + 1):
        x = x_of(2.0**k)
        d.line([(x, TOP - 6), (x, axis_y)], fill=(225, 225, 225) if k else (120, 120, 120))
        d.text((x - 12, axis_y + 6), f"{2.0 ** k:g}x", fill="black", font=small)
    for i, c in enumerate(rows):
        y = TOP + i * ROW + ROW // 2
        color = {True: GOOD, False: BAD, None: NEUTRAL}[c.met]
        x0, xm = x_of(1.0), x_of(c.ratio_median)
        d.rectangle([min(x0, xm), y - 11, max(x0, xm), y + 11], fill=color)
        x_lo, x_hi = x_of(c.ratio_min), x_of(c.ratio_max)
        d.line([(x_lo, y), (x_hi, y)], fill="black", width=2)
        d.line([(x_lo, y - 6), (x_lo, y + 6)], fill="black", width=2)
        d.line([(x_hi, y - 6), (x_hi, y + 6)], fill="black", width=2)
        right = max(x0, xm, x_hi)
        if c.goal is not None:
            xg = x_of(c.goal)
            d.line([(xg, y - 16), (xg, y + 16)], fill=GOAL, width=3)
            right = max(right, xg)
        label = c.name if c.ratio == "speedup" else f"{c.name} (lower is better)"
        d.text((12, y - 9), label[:48], fill="black", font=small if len(label) > 34 else font)
        d.text((right + 8, y - 7), f"{c.ratio_median:.2f}x", fill="black", font=small)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out
