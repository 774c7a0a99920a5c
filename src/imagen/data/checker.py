"""The Shapes checker: does an image (any resolution) show what its caption says?

Foreground pixels (far from the background colour) are assigned their nearest palette colour;
each colour's connected components above a minimum area are objects. An object's shape is
the template (circle, square, triangle) that best overlaps its mask within its bounding box;
its position is its bounding-box centre. A caption is satisfied when exactly the named objects
are present with the right colours and shapes, and the place or relation holds. Apart from
that verdict, :func:`background_error` measures how far the background strays from its colour
(a tint or noise that no caption check sees), and :func:`shape_fidelity` how closely each
object's mask matches a crisp rendering of its named shape at the object's position and size
(rounded corners and soft edges lower it; the verdict, which only picks the nearest template,
does not see them). With ``strict=True`` a square must fill its bounding box almost fully and a
circle must not (thresholds below, calibrated on crisp renders at 32 to 128 px).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

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
    grammar_caption,
    parse_caption,
    render_scene,
    scene_for_caption,
    shape_polygon,
)
from imagen.data.wording import HELDOUT_WORDS, words

_COLORS = list(PALETTE)
_PAL = np.array([PALETTE[c] for c in _COLORS], dtype=np.float32)
_BG = np.array(BACKGROUND, dtype=np.float32)

# The strict square / circle decision, by the fraction of its bounding box an object fills
# (the same at every resolution: a square with corners rounded to a radius r of its side s
# fills 1 - 0.86 (r / s)^2). Crisp renders (tests/test_shapes.py; 1,000 scenes, seed 1) fill,
# for squares, >= 0.960 at 32 px, >= 0.988 at 64 and >= 0.997 at 128 (a corner pixel can fall
# below half coverage) and, for circles, <= 0.884, 0.846 and 0.814 (an ideal circle: pi / 4).
# A square must fill >= 0.93 (corner radius at most 29% of its side); a circle <= 0.89; a fill
# between is neither (a rounded square, or a squarish circle).
STRICT_SQUARE_FILL = 0.93
STRICT_CIRCLE_FILL = 0.89
UNCLEAR = "unclear"  # the strict decision's shape for a fill between the thresholds


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


def classify_shape(mask: np.ndarray, strict: bool = False) -> tuple[str, dict[str, float]]:
    """Best-matching shape (by IoU with a template filling the mask's bounding box) and each
    shape's IoU. With ``strict`` a square or circle is decided by how much of its bounding box
    the mask fills (its IoU with the square template): square at >= STRICT_SQUARE_FILL,
    circle at <= STRICT_CIRCLE_FILL, UNCLEAR between."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape
    scores = {}
    for shape in SHAPES:
        t = _template(shape, w, h)
        inter = np.logical_and(t, crop).sum()
        union = np.logical_or(t, crop).sum()
        scores[shape] = float(inter / max(union, 1))
    return decide_shape(scores, strict), scores


def decide_shape(scores: dict[str, float], strict: bool = False) -> str:
    """The shape an object's template IoUs (see :func:`classify_shape`) decide: the best match,
    or with ``strict`` a square or circle by its fill (the square template's IoU)."""
    best = max(scores, key=scores.get)
    if not strict or best not in ("circle", "square"):
        return best
    fill = scores["square"]
    if fill >= STRICT_SQUARE_FILL:
        return "square"
    return "circle" if fill <= STRICT_CIRCLE_FILL else UNCLEAR


def detect_objects(
    image: Image.Image | np.ndarray,
    min_coverage: float = 0.5,
    min_area: float = 0.012,
    strict: bool = False,
) -> list[Detected]:
    """Find the coloured objects in an RGB image.

    Each pixel is explained as a blend ``a * colour + (1 - a) * background`` for the palette
    colour whose blend line lies nearest (so anti-aliased edges keep their object's colour);
    it is foreground when its coverage ``a`` exceeds ``min_coverage``. Components smaller
    than ``min_area`` (a fraction of the image) are noise. ``strict``: see
    :func:`classify_shape`.
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
            shape, scores = classify_shape(mask, strict)
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


def check_image(image: Image.Image | np.ndarray, caption: str, strict: bool = False) -> Verdict:
    """Decide whether ``image`` matches ``caption``; the reason names the first failure.
    ``strict``: squares and circles by the strict decision (see :func:`classify_shape`)."""
    return check_objects(detect_objects(image, strict=strict), caption)


def check_objects(objs: list[Detected], caption: str) -> Verdict:
    """The verdict of :func:`check_image` on objects already detected."""
    parsed = parse_caption(caption)
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
    """'heldout' for a caption naming any held-out colour-shape pair; else 'one' or 'two' for
    the grammar's own words (in any case), 'paraphrase' for other seen wording and
    'paraphrase_heldout' for a caption with held-out wording (:mod:`imagen.data.wording`)."""
    parsed = parse_caption(caption)
    if set(parsed.objects) & set(holdout):
        return "heldout"
    if caption.strip().lower() == grammar_caption(parsed):
        return parsed.kind
    return "paraphrase_heldout" if words(caption) & HELDOUT_WORDS else "paraphrase"


def object_fidelity(objs: list[Detected], caption: str) -> list[tuple[str, float]]:
    """Shape fidelity of each object ``caption`` names that was found exactly once (by its
    colour): its named shape and the IoU of its mask with a crisp rendering of that shape
    filling the mask's bounding box (1 for a perfect match; a square with rounded corners
    scores its fill). Missing or duplicated objects are left to the verdict."""
    out = []
    for color, shape in parse_caption(caption).objects:
        found = [o for o in objs if o.color == color]
        if len(found) == 1:
            out.append((shape, found[0].shape_scores[shape]))
    return out


def shape_fidelity(image: Image.Image | np.ndarray, caption: str) -> list[tuple[str, float]]:
    """:func:`object_fidelity` of the objects detected in ``image``."""
    return object_fidelity(detect_objects(image), caption)


def _mean_fidelity(per_object: list[tuple[str, float]]) -> dict[str, Any]:
    """Mean fidelity over all objects and per named shape (None where there are none)."""
    by_shape = {
        s: float(np.mean(v)) if (v := [f for n, f in per_object if n == s]) else None
        for s in SHAPES
    }
    mean = float(np.mean([f for _, f in per_object])) if per_object else None
    return {"mean": mean, "by_shape": by_shape, "objects": len(per_object)}


def render_fidelity(captions: list[str], size: int, seed: int = 0) -> dict[str, Any]:
    """Shape fidelity of crisp renders (at ``size`` px) of random scenes matching ``captions``:
    the reference a generated image of the same resolution is compared to (a crisp render
    scores below 1 where its edges fall between pixels, most at low resolution)."""
    rng = np.random.default_rng(seed)
    per_object = []
    for cap in captions:
        per_object += shape_fidelity(render_scene(scene_for_caption(cap, rng), size), cap)
    return _mean_fidelity(per_object)


def score(
    images: list[Image.Image],
    captions: list[str],
    holdout: tuple[tuple[str, str], ...] = DEFAULT_HOLDOUT,
) -> dict[str, Any]:
    """Accuracy per group (one, two, heldout, all) with failure reasons counted, by the
    default and the strict shape decision; the mean :func:`background_error` of the images;
    and their shape fidelity (mean over objects, and per shape), beside that of crisp renders
    of the same captions at the same resolution (``relative``: the ratio of the two)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    totals: Counter[str] = Counter()
    correct = {"default": Counter(), "strict": Counter()}
    reasons: dict[str, dict[str, Counter[str]]] = {"default": {}, "strict": {}}
    bg_error = 0.0
    per_object: list[tuple[str, float]] = []
    for img, cap in zip(images, captions, strict=True):
        bg_error += background_error(img) / len(images)
        group = caption_group(cap, holdout)
        objs = detect_objects(img)
        per_object += object_fidelity(objs, cap)
        strict = [replace(o, shape=decide_shape(o.shape_scores, True)) for o in objs]
        for mode, found in (("default", objs), ("strict", strict)):
            v = check_objects(found, cap)
            for g in (group, "all"):
                totals[g] += int(mode == "default")
                correct[mode][g] += int(v.ok)
            if not v.ok:
                reasons[mode].setdefault(group, Counter())[v.kind] += 1
    return {
        "accuracy": {g: correct["default"][g] / totals[g] for g in totals},
        "accuracy_strict": {g: correct["strict"][g] / totals[g] for g in totals},
        "count": dict(totals),
        "failures": {g: dict(c.most_common()) for g, c in reasons["default"].items()},
        "failures_strict": {g: dict(c.most_common()) for g, c in reasons["strict"].items()},
        "background_error": bg_error,
        "shape_fidelity": _fidelity_report(per_object, captions, images),
    }


def _fidelity_report(
    per_object: list[tuple[str, float]], captions: list[str], images: list[Image.Image]
) -> dict[str, Any]:
    """Generated images' fidelity beside crisp renders' at their resolution."""
    generated = _mean_fidelity(per_object)
    size = _rgb(images[0]).shape[0] if images else 0
    renders = render_fidelity(captions, size) if images else _mean_fidelity([])
    ratio = (
        generated["mean"] / renders["mean"]
        if generated["mean"] is not None and renders["mean"]
        else None
    )
    return {"generated": generated, "renders": renders, "relative": ratio, "resolution": size}
