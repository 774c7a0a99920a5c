"""Image-text folders: images with same-stem ``.txt`` captions (img2dataset's "files" output), or
a folder with ``metadata.jsonl`` / ``metadata.csv`` (the Hugging Face imagefolder convention:
a ``file_name`` column and a ``text`` or ``caption`` column).

Bad records never crash a run and are never silent: a record without a caption, or whose
caption is not UTF-8, is left out when the folder is scanned (counted in ``scan_skipped``); an
unreadable, too large or too small image is skipped when read (the next record is used in its
place) and counted by reason; 16-bit, grayscale, CMYK, palette and alpha images are converted
to RGB (see :mod:`imagen.data.images`) and counted.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from imagen.data.images import Preprocess, load_image_record

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
Sample = tuple[torch.Tensor, str, tuple[str, ...]]  # image, caption, what was skipped to get it
NOT_UTF8 = "caption not UTF-8"
MISSING_CAPTION = "missing caption"


def decode_caption(raw: bytes) -> str | None:
    """A caption's text (a UTF-8 byte-order mark and surrounding space removed), or None when
    the bytes are not UTF-8: such captions are skipped and counted, never patched with U+FFFD."""
    try:
        return raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        return None


def _is_utf8(text: str) -> bool:
    """False for text read with ``surrogateescape`` that held bytes which are not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _metadata_rows(root: Path) -> list[dict[str, Any]] | None:
    """The rows of metadata.jsonl or metadata.csv, if present. Bytes that are not UTF-8 are
    kept as surrogates, so one bad caption costs its record, not the whole file."""
    jsonl, table = root / "metadata.jsonl", root / "metadata.csv"
    if jsonl.is_file():
        rows = []
        text = jsonl.read_text(encoding="utf-8", errors="surrogateescape")
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{jsonl} line {n}: {e}") from e
        return rows
    if table.is_file():
        with open(table, newline="", encoding="utf-8", errors="surrogateescape") as f:
            return list(csv.DictReader(f))
    return None


def _read_metadata(root: Path) -> dict[str, str] | None:
    """file_name -> caption from metadata.jsonl or metadata.csv, if present."""
    rows = _metadata_rows(root)
    if rows is None:
        return None
    out = {}
    for row in rows:
        if not isinstance(row, dict):
            continue
        text = row.get("text", row.get("caption"))
        if isinstance(row.get("file_name"), str) and isinstance(text, str):
            out[row["file_name"]] = text
    return out


def _caption_of(path: Path, rel: str, meta: dict[str, str] | None) -> tuple[str | None, str]:
    """(caption, "") for image ``path`` (``rel`` inside the folder), or (None, why it has none):
    from the metadata when the folder has one, else from the same-stem .txt file."""
    if meta is not None:
        text = meta.get(rel)
        if text is None:
            return None, MISSING_CAPTION
        return (text, "") if _is_utf8(text) else (None, NOT_UTF8)
    txt = path.with_suffix(".txt")
    if not txt.is_file():
        return None, MISSING_CAPTION
    text = decode_caption(txt.read_bytes())
    return (text, "") if text is not None else (None, NOT_UTF8)


class ImageTextFolder(Dataset):
    """A folder of captioned images, as a map-style dataset of :data:`Sample`.

    ``prep`` is how images become inputs; an ``int`` means ``Preprocess(prep, **fields)``."""

    def __init__(self, root: str | Path, prep: Preprocess | int, **fields: Any) -> None:
        self.root = Path(root)
        self.prep = prep if isinstance(prep, Preprocess) else Preprocess(prep, **fields)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        meta = _read_metadata(self.root)
        images = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        self.records: list[tuple[Path, str]] = []
        self.scan_skipped: Counter[str] = Counter()
        for p in images:
            caption, why = _caption_of(p, p.relative_to(self.root).as_posix(), meta)
            if caption is None:
                self.scan_skipped[why] += 1
            else:
                self.records.append((p, caption))
        if not self.records:
            raise ValueError(
                f"no captioned images in {self.root} (skipped: {dict(self.scan_skipped)})"
            )

    @property
    def seed(self) -> int:
        return self.prep.seed

    def __len__(self) -> int:
        return len(self.records)

    def captions(self) -> list[str]:
        """The caption of every record, in index order."""
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
