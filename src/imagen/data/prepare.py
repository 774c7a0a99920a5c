"""Real-data recipes that work offline from Debian packages (``imagen prepare``).

Each writes an image-text folder (PNG files plus the Hugging Face ``metadata.jsonl``) that
``imagen train`` takes as ``data: {kind: folder, path: OUT}``.
"""

from __future__ import annotations

import gzip
import json
import struct
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FASHION_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
EMOJI_BLOCKS = (
    (0x1F300, 0x1F5FF),
    (0x1F600, 0x1F64F),
    (0x1F680, 0x1F6FF),
    (0x1F900, 0x1F9FF),
    (0x1FA70, 0x1FAFF),
)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _write_folder(out: Path, items: list[tuple[Image.Image, str]]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
        for i, (img, caption) in enumerate(items):
            name = f"{i:06d}.png"
            img.save(out / name)
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return len(items)


def prepare_fashion_mnist(
    out: str | Path, source: Path = FASHION_DIR, limit: int | None = None
) -> dict[str, int]:
    """Fashion-MNIST (Debian package dataset-fashion-mnist) as OUT/train and OUT/test folders
    with captions such as "a photo of a sneaker"."""
    if not (source / "train-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {source}; install it with: apt-get install dataset-fashion-mnist"
        )
    counts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")
        if len(images) != len(labels):
            raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
        n = len(images) if limit is None else min(limit, len(images))
        items = [
            (
                Image.fromarray(images[i]).convert("RGB"),
                f"a photo of a {FASHION_CLASSES[labels[i]]}",
            )
            for i in range(n)
        ]
        counts[split] = _write_folder(Path(out) / split, items)
    return counts


def render_emoji(ch: str, font: ImageFont.FreeTypeFont, size: int) -> Image.Image | None:
    """One emoji on white at ``size`` px; None when the font has no glyph for it."""
    canvas = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), ch, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.convert("RGB").resize((size, size), Image.LANCZOS)


def prepare_emoji(
    out: str | Path, font_path: Path = EMOJI_FONT, size: int = 128, limit: int | None = None
) -> dict[str, int]:
    """Colour emoji (Debian package fonts-noto-color-emoji) with their Unicode names as
    captions ("dog face"), as an image-text folder."""
    if not font_path.is_file():
        raise FileNotFoundError(
            f"emoji font not found at {font_path}; install it with: apt-get install fonts-noto-color-emoji"
        )
    font = ImageFont.truetype(str(font_path), 109)  # the font's only bitmap size
    items, skipped = [], Counter()
    for lo, hi in EMOJI_BLOCKS:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            name = unicodedata.name(ch, "")
            if not name:
                skipped["unassigned code point"] += 1
                continue
            img = render_emoji(ch, font, size)
            if img is None:
                skipped["no glyph"] += 1
                continue
            items.append((img, name.lower()))
            if limit is not None and len(items) >= limit:
                break
        if limit is not None and len(items) >= limit:
            break
    return {"images": _write_folder(Path(out), items), **skipped}
