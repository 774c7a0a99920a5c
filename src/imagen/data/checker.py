"""The Shapes checker: does an image (any resolution) show what its caption says?

Foreground pixels (far from the background colour) are assigned their nearest palette colour;
each colour's connected components above a minimum area are objects. An object's shape is
the template (circle, square, triangle) that best overlaps its mask within its bounding box;
its position is its bounding-box centre. A caption is satisfied when exactly the named objects
are present with the right colours and shapes, and the place or relation holds. Apart from
that verdict, :func:`background_error` measures how far the background strays from its colour
(a tint or noise that no caption check sees).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from imagen.data.shapes import (
    BACKGROUND,
    DEFAULT_HOLDOUT,
    PALETTE,
    PLACES,
    RELATIONS,
    SHAPES,
    parse_caption,
    shape_polygon,
)

_COLORS = list(PALETTE)
_PAL = np.array([PALETTE[c] for c in _COLORS], dtype=np.float32)
_BG = np.array(BACKGROUND, dtype=np.float32)


@dataclass
class Detected:
    """An object found in an image: colour, shape, centre (fractions of N), area fraction."""

    color: str
    shape: str
    cx: float
    cy: float
    area: float
    shape_scores: dict[str, float] = field(default_factory=dict)


FAILURE_KINDS = (
    "missing object",
    "duplicate colour",
    "wrong shape",
    "extra object",
    "wrong place",
    "wrong relation",
)


@dataclass
class Verdict:
    ok: bool
    reason: str  # "ok" or the first failure found, in words
    objects: list[Detected]
    kind: str = "ok"  # "ok" or one of FAILURE_KINDS


def _template(shape: str, w: int, h: int) -> np.ndarray:
    """A boolean mask of ``shape`` filling a w x h bounding box (rasterised at 4x)."""
    s = 4
    img = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([0, 0, w * s, h * s], fill=255)
    elif shape == "square":
        draw.rectangle([0, 0, w * s, h * s], fill=255)
    else:  # triangle, apex up: reuse the dataset's own geometry, stretched to the box
        poly = shape_polygon("triangle", 0.5, 0.5, 1.0)
        draw.polygon([(x * w * s, y * h * s) for x, y in poly], fill=255)
    small = img.resize((w, h), Image.BOX)
    return np.asarray(small) >= 128


def classify_shape(mask: np.ndarray) -> tuple[str, dict[str, float]]:
    """Best-matching shape (by IoU with a template filling the mask's bounding box)."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape
    scores = {}
    for shape in SHAPES:
        t = _template(shape, w, h)
        inter = np.logical_and(t, crop).sum()
        union = np.logical_or(t, crop).sum()
        scores[shape] = float(inter / max(union, 1))
    return max(scores, key=scores.get), scores


def detect_objects(
    image: Image.Image | np.ndarray,
    min_coverage: float = 0.5,
    min_area: float = 0.012,
) -> list[Detected]:
    """Find the coloured objects in an RGB image.

    Each pixel is explained as a blend ``a * colour + (1 - a) * background`` for the palette
    colour whose blend line lies nearest (so anti-aliased edges keep their object's colour);
    it is foreground when its coverage ``a`` exceeds ``min_coverage``. Components smaller
    than ``min_area`` (a fraction of the image) are noise.
    """
    arr = _rgb(image)
    n_h, n_w = arr.shape[:2]
    coverage, nearest = _coverage(arr)
    fg = coverage > min_coverage
    found: list[Detected] = []
    for ci, color in enumerate(_COLORS):
        labels, count = ndimage.label(fg & (nearest == ci))
        if count == 0:
            continue
        areas = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, count + 1))
        for lab, area in enumerate(areas, start=1):
            if area < min_area * n_h * n_w:
                continue
            mask = labels == lab
            ys, xs = np.nonzero(mask)
            shape, scores = classify_shape(mask)
            found.append(
                Detected(
                    color,
                    shape,
                    cx=(xs.min() + xs.max() + 1) / 2 / n_w,
                    cy=(ys.min() + ys.max() + 1) / 2 / n_h,
                    area=float(area) / (n_h * n_w),
                    shape_scores=scores,
                )
            )
    return found


def _rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)


def _coverage(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the palette colour whose blend with the background explains it best and that
    colour's coverage in [0, 1]."""
    rel = arr.astype(np.float32)[..., None, :] - _BG  # (H, W, 1, 3)
    direction = _PAL - _BG  # (colours, 3)
    coverage = ((rel * direction).sum(-1) / (direction**2).sum(-1)).clip(0.0, 1.0)
    residual = np.linalg.norm(rel - coverage[..., None] * direction, axis=-1)  # (H, W, colours)
    nearest = residual.argmin(-1)
    return np.take_along_axis(coverage, nearest[..., None], -1)[..., 0], nearest


def background_error(image: Image.Image | np.ndarray, min_coverage: float = 0.5) -> float:
    """Mean absolute difference (in 0-255 levels, over channels) between the background colour
    and the image's background: every pixel farther than a sixteenth of the image from any
    foreground pixel. 0 for a rendered scene; a tinted or noisy background scores higher."""
    arr = _rgb(image)
    fg = _coverage(arr)[0] > min_coverage
    margin = max(1, arr.shape[0] // 16)
    background = ~ndimage.binary_dilation(fg, iterations=margin)
    if not background.any():
        return 0.0
    return float(np.abs(arr[background].astype(np.float32) - _BG).mean())


def nearest_place(cx: float, cy: float) -> str:
    return min(PLACES, key=lambda p: (PLACES[p][0] - cx) ** 2 + (PLACES[p][1] - cy) ** 2)


def check_image(image: Image.Image | np.ndarray, caption: str) -> Verdict:
    """Decide whether ``image`` matches ``caption``; the reason names the first failure."""
    parsed = parse_caption(caption)
    objs = detect_objects(image)
    named_colors = [c for c, _ in parsed.objects]
    by_color = {c: [o for o in objs if o.color == c] for c in named_colors}
    for (color, shape), found in zip(parsed.objects, by_color.values(), strict=True):
        if not found:
            return Verdict(False, f"missing {color} object", objs, "missing object")
        if len(found) > 1:
            return Verdict(False, f"{len(found)} {color} objects", objs, "duplicate colour")
        if found[0].shape != shape:
            return Verdict(
                False, f"wrong shape: {color} {found[0].shape}, wanted {shape}", objs, "wrong shape"
            )
    extra = [o for o in objs if o.color not in named_colors]
    if extra:
        return Verdict(
            False, f"extra object(s): {', '.join(o.color for o in extra)}", objs, "extra object"
        )
    if parsed.place is not None:
        o = by_color[named_colors[0]][0]
        got = nearest_place(o.cx, o.cy)
        if got != parsed.place:
            return Verdict(False, f"wrong place: {got}, wanted {parsed.place}", objs, "wrong place")
        return Verdict(True, "ok", objs)
    a, b = by_color[named_colors[0]][0], by_color[named_colors[1]][0]
    axis, sign = RELATIONS[parsed.relation]
    delta = (b.cx - a.cx, b.cy - a.cy)  # from a to b
    along, across = delta[axis], delta[1 - axis]
    if not (-sign * along > 0 and abs(along) > abs(across)):
        return Verdict(False, f"wrong relation: not {parsed.relation}", objs, "wrong relation")
    return Verdict(True, "ok", objs)


def caption_group(caption: str, holdout: tuple[tuple[str, str], ...] = DEFAULT_HOLDOUT) -> str:
    """'one', 'two' or 'heldout' (names any held-out colour-shape pair)."""
    parsed = parse_caption(caption)
    if set(parsed.objects) & set(holdout):
        return "heldout"
    return parsed.kind


def score(
    images: list[Image.Image],
    captions: list[str],
    holdout: tuple[tuple[str, str], ...] = DEFAULT_HOLDOUT,
) -> dict[str, object]:
    """Accuracy per group (one, two, heldout, all) with failure reasons counted, and the mean
    :func:`background_error` of the images."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    totals: Counter[str] = Counter()
    correct: Counter[str] = Counter()
    reasons: dict[str, Counter[str]] = {}
    bg_error = 0.0
    for img, cap in zip(images, captions, strict=True):
        bg_error += background_error(img) / len(images)
        group = caption_group(cap, holdout)
        v = check_image(img, cap)
        for g in (group, "all"):
            totals[g] += 1
            correct[g] += int(v.ok)
        if not v.ok:
            reasons.setdefault(group, Counter())[v.kind] += 1
    return {
        "accuracy": {g: correct[g] / totals[g] for g in totals},
        "count": dict(totals),
        "failures": {g: dict(c.most_common()) for g, c in reasons.items()},
        "background_error": bg_error,
    }
