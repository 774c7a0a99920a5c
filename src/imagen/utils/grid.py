"""Captioned contact sheets: a grid of images with their captions underneath."""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont


def captioned_grid(
    images: list[Image.Image],
    captions: list[str],
    columns: int = 4,
    tile: int = 128,
) -> Image.Image:
    """Lay images out ``columns`` wide, each scaled to ``tile`` px with its caption below."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("no images to lay out")
    font = ImageFont.load_default()
    chars = max(8, tile // 6)
    wrapped = [textwrap.wrap(c, chars)[:4] or [""] for c in captions]
    text_h = 12 * max(len(w) for w in wrapped) + 4
    columns = min(columns, len(images))
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (tile + 4) + 4, rows * (tile + text_h + 4) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, lines) in enumerate(zip(images, wrapped, strict=True)):
        r, c = divmod(i, columns)
        x, y = 4 + c * (tile + 4), 4 + r * (tile + text_h + 4)
        sheet.paste(img.convert("RGB").resize((tile, tile), Image.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + tile + 2 + 12 * j), line, fill="black", font=font)
    return sheet
