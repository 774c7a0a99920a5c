"""Image-text folders: images with same-stem ``.txt`` captions (img2dataset's "files" output), or
a folder with ``metadata.jsonl`` / ``metadata.csv`` (the Hugging Face imagefolder convention:
a ``file_name`` column and a ``text`` or ``caption`` column).

Bad records never crash a run and are never silent: an unreadable image or a missing caption
is skipped (the next record is used in its place) and counted by reason; grayscale, CMYK,
palette and alpha images are converted to RGB and counted.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from imagen.data.shapes import pil_to_tensor

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
Sample = tuple[torch.Tensor, str, tuple[str, ...]]  # image, caption, what was skipped to get it


def to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any PIL image to RGB (alpha composited on white); returns the conversion made."""
    if img.mode == "RGB":
        return img, None
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB"), f"converted {mode}"
    return img.convert("RGB"), f"converted {mode}"


@dataclass(frozen=True)
class Preprocess:
    """How a stored image becomes a stage's training input."""

    size: int  # the stage's resolution
    resize_to: int = 0  # resize the shorter side to this, then crop size x size (0: to size);
    # larger than size trains on crops, as the paper's 256 -> 1024 model does
    min_size: int = 0  # skip images whose shorter side is smaller
    random_crop: bool = False  # random crops (training) or centre crops (evaluation)
    hflip: bool = False  # random horizontal flips; off by default: they break "left"/"right"

    @property
    def random(self) -> bool:
        return self.random_crop or self.hflip


def resize_and_crop(
    img: Image.Image, prep: Preprocess, rng: np.random.Generator | None
) -> Image.Image:
    """Resize the shorter side and crop a square: random when ``rng`` is given, else centre."""
    size, target = prep.size, max(prep.resize_to, prep.size)
    w, h = img.size
    scale = target / min(w, h)
    nw, nh = max(target, round(w * scale)), max(target, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=None if scale > 0.5 else 2.0)
    if rng is None or not prep.random_crop:
        left, top = (nw - size) // 2, (nh - size) // 2
    else:
        left, top = int(rng.integers(0, nw - size + 1)), int(rng.integers(0, nh - size + 1))
    img = img.crop((left, top, left + size, top + size))
    if prep.hflip and rng is not None and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def load_image_record(
    data: bytes | Path, prep: Preprocess, rng: np.random.Generator | None
) -> tuple[torch.Tensor | None, list[str]]:
    """Decode, convert and crop one image; returns (tensor or None if skipped, notes)."""
    notes: list[str] = []
    try:
        img = Image.open(data if isinstance(data, Path) else io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None, ["unreadable image"]
    if min(img.size) < prep.min_size:
        return None, ["image too small"]
    img, note = to_rgb(img)
    if note:
        notes.append(note)
    return pil_to_tensor(resize_and_crop(img, prep, rng)), notes


def _read_metadata(root: Path) -> dict[str, str] | None:
    """file_name -> caption from metadata.jsonl or metadata.csv, if present."""
    rows: list[dict[str, str]] = []
    if (root / "metadata.jsonl").is_file():
        for n, line in enumerate(
            (root / "metadata.jsonl").read_text(encoding="utf-8").splitlines(), 1
        ):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{root / 'metadata.jsonl'} line {n}: {e}") from e
    elif (root / "metadata.csv").is_file():
        with open(root / "metadata.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        return None
    out = {}
    for row in rows:
        text = row.get("text", row.get("caption"))
        if "file_name" in row and isinstance(text, str):
            out[row["file_name"]] = text
    return out


class ImageTextFolder(Dataset):
    """A folder of captioned images, as a map-style dataset of :data:`Sample`."""

    def __init__(
        self,
        root: str | Path,
        size: int,
        random_crop: bool = False,
        min_size: int = 0,
        seed: int = 0,
        resize_to: int = 0,
        hflip: bool = False,
    ) -> None:
        self.root, self.seed = Path(root), seed
        self.prep = Preprocess(size, resize_to, min_size, random_crop, hflip)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        meta = _read_metadata(self.root)
        images = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        self.records: list[tuple[Path, str]] = []
        self.scan_skipped: Counter[str] = Counter()
        for p in images:
            rel = p.relative_to(self.root).as_posix()
            if meta is not None:
                caption = meta.get(rel)
            else:
                txt = p.with_suffix(".txt")
                caption = (
                    txt.read_text(encoding="utf-8", errors="replace").strip()
                    if txt.is_file()
                    else None
                )
            if caption is None:
                self.scan_skipped["missing caption"] += 1
            else:
                self.records.append((p, caption))
        if not self.records:
            raise ValueError(
                f"no captioned images in {self.root} (skipped: {dict(self.scan_skipped)})"
            )

    def __len__(self) -> int:
        return len(self.records)

    def captions(self) -> list[str]:
        return [c for _, c in self.records]

    def __getitem__(self, index: int) -> Sample:
        skipped: list[str] = []
        n = len(self.records)
        for k in range(n):
            path, caption = self.records[(index + k) % n]
            rng = np.random.default_rng([self.seed, index, k]) if self.prep.random else None
            image, notes = load_image_record(path, self.prep, rng)
            skipped += notes
            if image is not None:
                return image, caption, tuple(skipped)
        raise ValueError(f"no readable image in {self.root} (skipped: {Counter(skipped)})")
