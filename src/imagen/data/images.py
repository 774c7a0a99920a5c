"""Decoding stored images into training inputs: the one decoder every data source uses.

An image is refused before it is decoded when its header claims more than ``max_pixels``
pixels, so a decompression bomb (a small file claiming 30000 x 30000) costs nothing. Every
mode Pillow reads becomes 8-bit RGB with its full range kept: 16-bit samples are scaled (not
clipped to white), alpha and palette transparency are composited on white. A refused or
converted image is reported as a note (the reason), which the caller counts.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from imagen.utils.pil import pil_to_tensor

# 64 MP: the largest common camera sensors (61 MP, 9504 x 6336) pass, while one decode stays
# under about 200 MB as 8-bit RGB (400 MB for 16-bit input) per data-loader worker, whatever
# the file claims. Pillow's own limit (2 x Image.MAX_IMAGE_PIXELS, about 179 MP) would let a
# 13000 x 13000 image through: 1 GB and seconds of work for a 1 MP training crop.
DEFAULT_MAX_PIXELS = 64_000_000

TOO_LARGE = "image too large"
TOO_SMALL = "image too small"
UNREADABLE = "unreadable image"
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)


@dataclass(frozen=True)
class Preprocess:
    """How a stored image becomes a stage's training input."""

    size: int  # the stage's resolution
    resize_to: int = 0  # resize the shorter side to this, then crop size x size (0: to size);
    # larger than size trains on crops, as the paper's 256 -> 1024 model does
    min_size: int = 0  # skip images whose shorter side is smaller
    random_crop: bool = False  # random crops (training) or centre crops (evaluation)
    hflip: bool = False  # random horizontal flips; off by default: they break "left"/"right"
    seed: int = 0  # seed of the random crops and flips
    max_pixels: int = DEFAULT_MAX_PIXELS  # skip images whose header claims more pixels

    @property
    def random(self) -> bool:
        return self.random_crop or self.hflip


def _open(data: bytes | Path) -> Image.Image:
    """Open an image lazily (the header only); Pillow's bomb warning is ours to report."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(data if isinstance(data, Path) else io.BytesIO(data))


def _scaled_to_8bit(img: Image.Image) -> Image.Image:
    """A single-channel 16-bit, 32-bit integer or float image as 8-bit grayscale, full range
    kept: 16-bit and ``I`` samples span 0..65535 (how Pillow reads 16-bit PNG and TIFF), float
    samples 0..1 (or 0..255 when any exceeds 1)."""
    arr = np.asarray(img)
    if img.mode == "F":
        values = np.nan_to_num(arr.astype(np.float32))
        top = 255.0 if float(values.max(initial=0.0)) > 1.0 else 1.0
        out = np.clip(np.rint(values * (255.0 / top)), 0, 255)
    else:  # v / 257 rounded, in integers (4 bytes a pixel, whatever the image's size)
        out = (np.clip(arr, 0, 65535).astype(np.uint32) * 255 + 32767) // 65535
    return Image.fromarray(out.astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any PIL image to 8-bit RGB (alpha and transparency composited on white);
    returns the conversion made."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in SIXTEEN_BIT or mode in ("I", "F"):
        return _scaled_to_8bit(img).convert("RGB"), f"converted {mode}"
    if "A" in mode or "a" in mode or "transparency" in img.info:
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB"), f"converted {mode}"
    return img.convert("RGB"), f"converted {mode}"


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


def decode_image(data: bytes | Path, prep: Preprocess) -> tuple[Image.Image | None, list[str]]:
    """Decode one stored image to 8-bit RGB, checking its size from the header first; returns
    (the image, or None if it is skipped, notes: the reason for a skip or the conversion)."""
    try:
        img = _open(data)
    except Image.DecompressionBombError:
        return None, [TOO_LARGE]
    except DECODE_ERRORS:
        return None, [UNREADABLE]
    with img:
        w, h = img.size
        if w * h > prep.max_pixels:
            return None, [TOO_LARGE]
        if min(w, h) < prep.min_size:
            return None, [TOO_SMALL]
        try:
            img.load()
            rgb, note = to_rgb(img)
        except DECODE_ERRORS:
            return None, [UNREADABLE]
        rgb.load()  # detach from the file before it closes
    return rgb, [note] if note else []


def load_image_record(
    data: bytes | Path, prep: Preprocess, rng: np.random.Generator | None
) -> tuple[torch.Tensor | None, list[str]]:
    """Decode, convert and crop one image; returns (tensor or None if skipped, notes)."""
    img, notes = decode_image(data, prep)
    if img is None:
        return None, notes
    return pil_to_tensor(resize_and_crop(img, prep, rng)), notes


def decode_user_image(
    data: bytes | Path, name: str, mode: str = "RGB", max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """An image a user hands in (``--init-image``, ``--mask``, ``upscale`` inputs, a request),
    decoded under the same pixel limit as training data, checked from the header before any
    pixel is decoded: a ValueError of one line naming ``name`` if it is too large or
    unreadable. ``mode`` RGB converts as training data does (16-bit scaled, alpha on white);
    other modes (``L`` for masks) convert directly (16-bit scaled)."""
    try:
        img = _open(data)
    except Image.DecompressionBombError:
        raise ValueError(f"{name}: {_too_large(None, max_pixels)}") from None
    except DECODE_ERRORS as e:
        raise ValueError(f"{name}: not a readable image ({e})") from None
    with img:
        if img.size[0] * img.size[1] > max_pixels:
            raise ValueError(f"{name}: {_too_large(img.size, max_pixels)}")
        try:
            img.load()
            if mode == "RGB":
                out = to_rgb(img)[0]
            elif img.mode in SIXTEEN_BIT or img.mode in ("I", "F"):
                out = _scaled_to_8bit(img).convert(mode)
            else:
                out = img.convert(mode)
            out.load()
        except DECODE_ERRORS as e:
            raise ValueError(f"{name}: not a readable image ({e})") from None
    return out


def check_user_image(
    data: bytes | Path, name: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[int, int]:
    """The size an image's header claims, after checking it as :func:`decode_user_image`
    does, without decoding any pixel (to check every input before any work starts)."""
    try:
        with _open(data) as img:
            size = img.size
    except Image.DecompressionBombError:
        raise ValueError(f"{name}: {_too_large(None, max_pixels)}") from None
    except DECODE_ERRORS as e:
        raise ValueError(f"{name}: not a readable image ({e})") from None
    if size[0] * size[1] > max_pixels:
        raise ValueError(f"{name}: {_too_large(size, max_pixels)}")
    return size


def _too_large(size: tuple[int, int] | None, max_pixels: int) -> str:
    claim = f"{size[0]} x {size[1]} pixels" if size else "far more pixels than Pillow allows"
    return (
        f"image too large: its header claims {claim}, over the limit of "
        f"{max_pixels / 1e6:g} megapixels (refused before decoding)"
    )
