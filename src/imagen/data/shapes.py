"""Shapes: a procedural, infinite, captioned dataset for learning text conditioning in minutes.

A scene (coloured circles, squares and triangles at described places) is drawn from a seed
and an index, and renders at any resolution, so the same scene is consistent at every
stage of a cascade. The grammar and geometry are a specification other tools rely on
(see the data issue): keep them exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

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


@dataclass(frozen=True)
class ParsedCaption:
    """A caption of the Shapes grammar: one object with a place, or two with a relation."""

    objects: tuple[tuple[str, str], ...]  # (color, shape) per named object
    place: str | None = None
    relation: str | None = None

    @property
    def kind(self) -> str:
        return "one" if len(self.objects) == 1 else "two"


_COLOR = "|".join(PALETTE)
_SHAPE = "|".join(SHAPES)
_ONE = re.compile(rf"^a ({_COLOR}) ({_SHAPE}) ({'|'.join(PLACES)})$")
_TWO = re.compile(rf"^a ({_COLOR}) ({_SHAPE}) ({'|'.join(RELATIONS)}) a ({_COLOR}) ({_SHAPE})$")


def parse_caption(caption: str) -> ParsedCaption:
    """Parse a Shapes caption; raises ValueError for anything outside the grammar."""
    text = caption.strip().lower()
    m = _ONE.match(text)
    if m:
        return ParsedCaption(((m[1], m[2]),), place=m[3])
    m = _TWO.match(text)
    if m:
        if m[1] == m[4]:
            raise ValueError(f"two-object captions name two different colours: {caption!r}")
        return ParsedCaption(((m[1], m[2]), (m[4], m[5])), relation=m[3])
    raise ValueError(f"not a Shapes caption: {caption!r}")


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


def _allowed_pairs(holdout: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    held = set(holdout)
    return [(c, s) for c in PALETTE for s in SHAPES if (c, s) not in held]


def sample_scene(
    rng: np.random.Generator,
    holdout: tuple[tuple[str, str], ...] = DEFAULT_HOLDOUT,
    two_object_fraction: float = 0.5,
) -> Scene:
    """Draw one random scene (never using a held-out colour-shape pair)."""
    pairs = _allowed_pairs(holdout)
    if rng.random() >= two_object_fraction:
        c, s = pairs[rng.integers(len(pairs))]
        place = list(PLACES)[rng.integers(len(PLACES))]
        return scene_for_caption(one_object_caption(c, s, place), rng)
    while True:
        (c1, s1), (c2, s2) = (pairs[i] for i in rng.integers(len(pairs), size=2))
        if c1 != c2:
            break
    rel = list(RELATIONS)[rng.integers(len(RELATIONS))]
    return scene_for_caption(two_object_caption(c1, s1, rel, c2, s2), rng)


def scene_for_caption(caption: str, rng: np.random.Generator) -> Scene:
    """A random scene that matches ``caption`` (positions and sizes jittered per the spec)."""
    p = parse_caption(caption)
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


def render_scene(scene: Scene, size: int) -> Image.Image:
    """Render a scene at ``size`` px: drawn at SUPERSAMPLE x, then box-filtered down."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        draw_shape(draw, obj, big, PALETTE[obj.color])
    return img.resize((size, size), Image.BOX)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 RGB PIL image -> float tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [-1, 1] -> uint8 RGB PIL image."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())


@dataclass
class ShapesConfig:
    """The Shapes dataset's settings."""

    seed: int = 0
    two_object_fraction: float = 0.5
    holdout: list[list[str]] = field(default_factory=lambda: [list(p) for p in DEFAULT_HOLDOUT])

    def holdout_pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple((c, s) for c, s in self.holdout)


class ShapesDataset(Dataset):
    """Map-style view of the infinite Shapes stream: item i is (image in [-1, 1], caption, ()),
    deterministic for (seed, i). ``length`` only bounds epoch-style iteration."""

    def __init__(
        self, size: int, config: ShapesConfig | None = None, length: int = 1 << 30
    ) -> None:
        self.size, self.config, self.length = size, config or ShapesConfig(), length

    def __len__(self) -> int:
        return self.length

    def captions(self) -> list[str]:
        """Every caption this dataset can yield (the seen one- and two-object captions)."""
        groups = all_captions(self.config.holdout_pairs())
        return groups["one"] + groups["two"]

    def scene(self, index: int) -> Scene:
        rng = np.random.default_rng([self.config.seed, index])
        return sample_scene(rng, self.config.holdout_pairs(), self.config.two_object_fraction)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, tuple[str, ...]]:
        scene = self.scene(index)
        return pil_to_tensor(render_scene(scene, self.size)), scene.caption, ()
