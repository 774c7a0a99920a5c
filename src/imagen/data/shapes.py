"""Shapes: a procedural, infinite, captioned dataset for learning text conditioning in minutes.

A scene (coloured circles, squares and triangles at described places) is drawn from a seed
and an index, and renders at any resolution, so the same scene is consistent at every
stage of a cascade. The grammar and geometry are a specification other tools rely on
(see the data issue): keep them exactly.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from imagen.data.wording import (
    LEXICONS,
    ParsedCaption,
    paraphrase,
    parse_wording,
    seen_words,
)

BACKGROUND = (20, 20, 20)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 70, 240),
    "yellow": (240, 225, 30),
    "white": (245, 245, 245),
    "purple": (150, 40, 200),
}
SHAPES = ("circle", "square", "triangle")
PLACES: dict[str, tuple[float, float]] = {
    "on the left": (0.25, 0.5),
    "on the right": (0.75, 0.5),
    "at the top": (0.5, 0.25),
    "at the bottom": (0.5, 0.75),
    "in the center": (0.5, 0.5),
}
# relation -> (axis, sign): "a above b" puts a at the smaller y (y grows downwards)
RELATIONS: dict[str, tuple[int, int]] = {
    "above": (1, -1),
    "below": (1, 1),
    "left of": (0, -1),
    "right of": (0, 1),
}
DEFAULT_HOLDOUT: tuple[tuple[str, str], ...] = (("purple", "triangle"),)
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeObject:
    """One object: colour and shape names, centre (cx, cy) and size d, as fractions of N."""

    color: str
    shape: str
    cx: float
    cy: float
    d: float


@dataclass(frozen=True)
class Scene:
    caption: str
    objects: tuple[ShapeObject, ...]


_COLOR = "|".join(PALETTE)
_SHAPE = "|".join(SHAPES)
_ONE = re.compile(rf"^a ({_COLOR}) ({_SHAPE}) ({'|'.join(PLACES)})$")
_TWO = re.compile(rf"^a ({_COLOR}) ({_SHAPE}) ({'|'.join(RELATIONS)}) a ({_COLOR}) ({_SHAPE})$")


def parse_caption(caption: str) -> ParsedCaption:
    """Parse a Shapes caption, in the grammar's words or any paraphrase of them
    (:mod:`imagen.data.wording`); raises ValueError for anything else."""
    text = caption.strip().lower()
    m = _ONE.match(text)
    if m:
        return ParsedCaption(((m[1], m[2]),), place=m[3])
    m = _TWO.match(text)
    if m:
        if m[1] == m[4]:
            raise ValueError(f"two-object captions name two different colours: {caption!r}")
        return ParsedCaption(((m[1], m[2]), (m[4], m[5])), relation=m[3])
    parsed = parse_wording(caption)
    if parsed is None:
        raise ValueError(f"not a Shapes caption: {caption!r}")
    return parsed


def grammar_caption(parsed: ParsedCaption) -> str:
    """The grammar's own caption of ``parsed``."""
    if parsed.place is not None:
        return one_object_caption(*parsed.objects[0], parsed.place)
    (c1, s1), (c2, s2) = parsed.objects
    return two_object_caption(c1, s1, parsed.relation, c2, s2)


def one_object_caption(color: str, shape: str, place: str) -> str:
    return f"a {color} {shape} {place}"


def two_object_caption(c1: str, s1: str, rel: str, c2: str, s2: str) -> str:
    return f"a {c1} {s1} {rel} a {c2} {s2}"


def all_captions(holdout: tuple[tuple[str, str], ...] = DEFAULT_HOLDOUT) -> dict[str, list[str]]:
    """Every caption of the grammar, split into seen one-object, seen two-object and held-out
    (a caption is held out when it names any held-out (colour, shape) pair)."""
    held = set(holdout)
    groups: dict[str, list[str]] = {"one": [], "two": [], "heldout": []}
    pairs = [(c, s) for c in PALETTE for s in SHAPES]
    for c, s in pairs:
        for place in PLACES:
            groups["heldout" if (c, s) in held else "one"].append(one_object_caption(c, s, place))
    for c1, s1 in pairs:
        for c2, s2 in pairs:
            if c1 == c2:
                continue
            for rel in RELATIONS:
                cap = two_object_caption(c1, s1, rel, c2, s2)
                groups["heldout" if {(c1, s1), (c2, s2)} & held else "two"].append(cap)
    return groups


@functools.cache
def _allowed_pairs(holdout: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    held = set(holdout)
    return tuple((c, s) for c in PALETTE for s in SHAPES if (c, s) not in held)


_PLACE_NAMES, _RELATION_NAMES = tuple(PLACES), tuple(RELATIONS)


def sample_scene(
    rng: np.random.Generator,
    holdout: tuple[tuple[str, str], ...] = DEFAULT_HOLDOUT,
    two_object_fraction: float = 0.5,
) -> Scene:
    """Draw one random scene (never using a held-out colour-shape pair)."""
    pairs = _allowed_pairs(holdout)
    if rng.random() >= two_object_fraction:
        c, s = pairs[rng.integers(len(pairs))]
        place = _PLACE_NAMES[rng.integers(len(PLACES))]
        parsed = ParsedCaption(((c, s),), place=place)
        return _jittered_scene(parsed, one_object_caption(c, s, place), rng)
    while True:
        (c1, s1), (c2, s2) = (pairs[i] for i in rng.integers(len(pairs), size=2))
        if c1 != c2:
            break
    rel = _RELATION_NAMES[rng.integers(len(RELATIONS))]
    parsed = ParsedCaption(((c1, s1), (c2, s2)), relation=rel)
    return _jittered_scene(parsed, two_object_caption(c1, s1, rel, c2, s2), rng)


def scene_for_caption(caption: str, rng: np.random.Generator) -> Scene:
    """A random scene that matches ``caption`` (positions and sizes jittered per the spec)."""
    return _jittered_scene(parse_caption(caption), caption, rng)


def _jittered_scene(p: ParsedCaption, caption: str, rng: np.random.Generator) -> Scene:
    """The scene of parsed caption ``p``, positions and sizes drawn from ``rng``."""
    if p.place is not None:
        (c, s), (x, y) = p.objects[0], PLACES[p.place]
        jx, jy = rng.uniform(-0.06, 0.06, size=2)
        d = rng.uniform(0.28, 0.36)
        return Scene(caption, (ShapeObject(c, s, x + jx, y + jy, d),))
    axis, sign = RELATIONS[p.relation]
    first, second = (0.25, 0.75) if sign < 0 else (0.75, 0.25)
    objs = []
    for (c, s), along in zip(p.objects, (first, second), strict=True):
        pos = [0.5 + rng.uniform(-0.1, 0.1), 0.5 + rng.uniform(-0.1, 0.1)]
        pos[axis] = along + rng.uniform(-0.05, 0.05)
        objs.append(ShapeObject(c, s, pos[0], pos[1], rng.uniform(0.28, 0.37)))
    return Scene(caption, tuple(objs))


def shape_polygon(shape: str, cx: float, cy: float, d: float) -> list[tuple[float, float]] | None:
    """Vertices (in the same units as cx, cy, d) of a square or triangle; None for a circle."""
    if shape == "square":
        h = 0.45 * d  # side 0.9 d
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # upright isosceles, base d, height d, centred on its bounding box
        return [(cx, cy - d / 2), (cx + d / 2, cy + d / 2), (cx - d / 2, cy + d / 2)]
    return None


def draw_shape(draw: ImageDraw.ImageDraw, obj: ShapeObject, n: int, fill: object) -> None:
    """Draw one object on a canvas of side ``n`` pixels."""
    cx, cy, d = obj.cx * n, obj.cy * n, obj.d * n
    poly = shape_polygon(obj.shape, cx, cy, d)
    if poly is None:
        draw.ellipse([cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def _canvas(scene: Scene, size: int) -> Image.Image:
    """The scene drawn at SUPERSAMPLE x ``size`` px."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        draw_shape(draw, obj, big, PALETTE[obj.color])
    return img


def _object_blocks(scene: Scene, size: int) -> list[tuple[int, int, int, int]]:
    """Per object, the output pixels (x0, y0, x1, y1) its drawing can reach: its bounding box
    with a margin of one output pixel, clipped to the image."""
    blocks = []
    for obj in scene.objects:
        r = 0.5 * obj.d  # every shape fits in the square of side d around its centre
        lo = [math.floor((c - r) * size) - 1 for c in (obj.cx, obj.cy)]
        hi = [math.ceil((c + r) * size) + 1 for c in (obj.cx, obj.cy)]
        x0, y0 = (max(0, v) for v in lo)
        x1, y1 = (min(size, v) for v in hi)
        if x0 < x1 and y0 < y1:
            blocks.append((x0, y0, x1, y1))
    return blocks


def _paste_scene(out: Image.Image, top: int, scene: Scene, size: int) -> None:
    """Paste the scene's objects into ``out`` (background already) at rows top .. top + size.
    Box filtering at an integer factor makes each output pixel from its own SUPERSAMPLE x
    SUPERSAMPLE block, so only the blocks around objects are filtered: exactly the pixels of
    filtering the whole canvas, several times faster."""
    big, s = _canvas(scene, size), SUPERSAMPLE
    for x0, y0, x1, y1 in _object_blocks(scene, size):
        region = big.crop((x0 * s, y0 * s, x1 * s, y1 * s)).resize((x1 - x0, y1 - y0), Image.BOX)
        out.paste(region, (x0, top + y0))


def render_scene(scene: Scene, size: int) -> Image.Image:
    """Render a scene at ``size`` px: drawn at SUPERSAMPLE x, then box-filtered down."""
    out = Image.new("RGB", (size, size), BACKGROUND)
    _paste_scene(out, 0, scene, size)
    return out


def render_batch(scenes: list[Scene], size: int) -> torch.Tensor:
    """Scenes rendered as one float tensor (N, 3, size, size) in [-1, 1]: the pixels of
    :func:`render_scene` and the values of :func:`~imagen.utils.pil.pil_to_tensor`, converted in one go."""
    out = Image.new("RGB", (size, size * len(scenes)), BACKGROUND)
    for k, scene in enumerate(scenes):
        _paste_scene(out, k * size, scene, size)
    arr = np.array(out).reshape(len(scenes), size, size, 3)
    images = torch.empty(len(scenes), 3, size, size)  # contiguous, as collating wants
    return images.copy_(torch.from_numpy(arr).permute(0, 3, 1, 2)).div_(127.5).sub_(1.0)


@dataclass
class ShapesConfig:
    """The Shapes dataset's settings."""

    seed: int = 0
    two_object_fraction: float = 0.5
    holdout: list[list[str]] = field(default_factory=lambda: [list(p) for p in DEFAULT_HOLDOUT])
    # the fraction of captions said in other words (seen wording of imagen.data.wording; each
    # drawn on a stream of its own, so the scenes, and with 0 the captions, are as without it)
    paraphrase: float = 0.0
    # which seen wording the paraphrases draw (imagen.data.wording.LEXICONS): "standard" (v4's)
    # or "broad" (about twice the phrasings)
    wording: str = "standard"

    def __post_init__(self) -> None:
        p = self.paraphrase
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
            raise ValueError(f"data.shapes.paraphrase must be a number in [0, 1], got {p!r}")
        if self.wording not in LEXICONS:
            known = ", ".join(LEXICONS)
            raise ValueError(f"data.shapes.wording must be one of {known}, got {self.wording!r}")

    def holdout_pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple((c, s) for c, s in self.holdout)


_PARAPHRASE_STREAM = 1  # the paraphrase draws of item i: default_rng([seed, i, 1])


class ShapesScenes(Dataset):
    """Map-style view of the infinite Shapes stream: item i is (image in [-1, 1], caption, ()),
    deterministic for (seed, i). ``length`` only bounds epoch-style iteration."""

    def __init__(
        self, size: int, config: ShapesConfig | None = None, length: int = 1 << 30
    ) -> None:
        self.size, self.config, self.length = size, config or ShapesConfig(), length
        self.holdout = self.config.holdout_pairs()

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        """Scene ``index``, captioned in the grammar."""
        rng = np.random.default_rng([self.config.seed, index])
        return sample_scene(rng, self.holdout, self.config.two_object_fraction)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, tuple[str, ...]]:
        scene = self.scene(index)
        return render_batch([scene], self.size)[0], scene.caption, ()

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, str, tuple[str, ...]]]:
        """Items ``indices`` at once (what a DataLoader fetches for a batch): the same items
        as ``__getitem__``, rendered into one array and converted together."""
        scenes = [self.scene(i) for i in indices]
        images = render_batch(scenes, self.size)
        return [(images[k], scene.caption, ()) for k, scene in enumerate(scenes)]


class ShapesDataset(ShapesScenes):
    """The Shapes stream with the grammar's captions: a small, known set (:meth:`captions`)."""

    def captions(self) -> list[str]:
        """Every caption this dataset can yield (the seen one- and two-object captions)."""
        groups = all_captions(self.config.holdout_pairs())
        return groups["one"] + groups["two"]


class ParaphrasedShapes(ShapesScenes):
    """The Shapes stream with a fraction (``config.paraphrase``) of its captions said in seen
    wording of :mod:`imagen.data.wording`: the same scenes and images as
    :class:`ShapesDataset`, captions too many to list, so it has a :meth:`vocabulary`
    instead of ``captions``."""

    def scene(self, index: int) -> Scene:
        scene = super().scene(index)
        rng = np.random.default_rng([self.config.seed, index, _PARAPHRASE_STREAM])
        if rng.random() >= self.config.paraphrase:
            return scene
        caption = paraphrase(parse_caption(scene.caption), rng, lexicon=self.config.wording)
        return Scene(caption, scene.objects)

    def vocabulary(self) -> list[str]:
        """Every word a caption of this dataset can have, sorted."""
        return sorted(seen_words(self.config.wording))


def shapes_dataset(size: int, config: ShapesConfig | None = None) -> ShapesScenes:
    """The Shapes dataset ``config`` asks for: grammar captions, or some paraphrased."""
    config = config or ShapesConfig()
    return ParaphrasedShapes(size, config) if config.paraphrase > 0 else ShapesDataset(size, config)
