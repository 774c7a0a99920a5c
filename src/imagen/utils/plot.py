"""Line charts drawn with Pillow (no plotting library): the training curves a run directory
shows as a picture."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

Series = tuple[list[float], list[float]]  # x values, y values


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def _fmt(v: float, log: bool) -> str:
    v = 10**v if log else v
    return f"{v:.2g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3g}"


def line_panel(
    draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], series: Series, title: str, log: bool
) -> None:
    """One chart of ``series`` inside ``box`` (left, top, right, bottom), y on a log10 scale
    when ``log``: axes, four ticks on each, the title and the line."""
    font = ImageFont.load_default()
    left, top, right, bottom = box
    x0, y0, x1, y1 = left + 52, top + 18, right - 10, bottom - 22
    draw.text((left + 52, top + 2), title, fill="black", font=font)
    draw.rectangle([x0, y0, x1, y1], outline="black")
    xs, ys = series
    pts = [
        (x, math.log10(y) if log else y)
        for x, y in zip(xs, ys, strict=True)
        if math.isfinite(y) and (y > 0 or not log)
    ]
    if not pts:
        draw.text((x0 + 8, y0 + 8), "no data yet", fill="gray", font=font)
        return
    xlo, xhi = min(p[0] for p in pts), max(p[0] for p in pts)
    ylo, yhi = min(p[1] for p in pts), max(p[1] for p in pts)
    xhi, yhi = (xhi if xhi > xlo else xlo + 1), (yhi if yhi > ylo else ylo + 1e-9 + abs(ylo))

    def at(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    for v in _ticks(ylo, yhi):
        _, py = at(xlo, v)
        draw.line([x0 - 3, py, x0, py], fill="black")
        draw.text((left + 2, py - 6), _fmt(v, log), fill="black", font=font)
    for v in _ticks(xlo, xhi):
        px, _ = at(v, ylo)
        draw.line([px, y1, px, y1 + 3], fill="black")
        draw.text((px - 12, y1 + 6), f"{v:.0f}", fill="black", font=font)
    draw.line([at(x, y) for x, y in pts] if len(pts) > 1 else [at(*pts[0])] * 2, fill="blue")


def curves_image(panels: list[tuple[str, Series, bool]], width: int = 720) -> Image.Image:
    """Stack one chart per (title, series, log y) panel."""
    height = 200
    img = Image.new("RGB", (width, height * len(panels)), "white")
    draw = ImageDraw.Draw(img)
    for i, (title, series, log) in enumerate(panels):
        line_panel(draw, (0, i * height, width, (i + 1) * height), series, title, log)
    return img
