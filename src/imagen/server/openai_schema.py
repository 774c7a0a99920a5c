"""The OpenAI Images API's parameters as this server reads them (built from the server's limits
and on the same settings model as ``POST /v1/generate``), and what each maps to here.

- ``size``: "WxH", one of the cascade's stage sizes; a smaller stage's size stops the cascade
  there. "auto" or none: the last stage's. Any other size is refused (never resized).
- ``quality``: the denoiser steps, as a multiple of each stage's default: low 0.5, medium,
  standard and auto 1, high and hd 1.5, xhigh and max 2 (at most ``max_steps``). ``steps``
  given as an extension wins.
- ``output_format``: png (default), jpeg or webp; ``output_compression`` is the JPEG/WebP
  quality (default 100).
- ``background``: opaque and auto are what the model makes; transparent is refused.
- ``style``, ``moderation``, ``user``, ``safety_identifier``, ``input_fidelity``,
  ``partial_images``: accepted and ignored. ``stream`` true is refused.
- Extensions: ``seed``, ``negative_prompt``, ``steps``, ``guidance`` and (edits, variations)
  ``strength``.
"""

from __future__ import annotations

import io
import math
import secrets
import time
from collections import OrderedDict
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from imagen.models.sampling import SamplingConfig
from imagen.server.schema import ServerConfig, prompt_model, settings_model

QUALITY_STEPS = {
    "low": 0.5,
    "medium": 1.0,
    "standard": 1.0,
    "auto": 1.0,
    "high": 1.5,
    "hd": 1.5,
    "xhigh": 2.0,
    "max": 2.0,
}
Quality = Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"]
FORMATS = {
    "png": ("PNG", "image/png"),
    "jpeg": ("JPEG", "image/jpeg"),
    "webp": ("WEBP", "image/webp"),
}


def options_model(
    cfg: ServerConfig, defaults: list[SamplingConfig], resolutions: list[int]
) -> type[BaseModel]:
    """The parameters every OpenAI image route takes (see the module's docstring)."""
    sizes = ", ".join(f"{r}x{r}" for r in resolutions)

    class ImageOptions(settings_model(cfg, defaults)):  # type: ignore[misc]
        model_config = ConfigDict(extra="forbid")

        n: int | None = Field(None, ge=1, le=cfg.max_images, description="images to make")
        size: str | None = Field(None, max_length=32, description=f"auto, {sizes}")
        response_format: Literal["b64_json", "url"] | None = Field(
            None, description=f"b64_json (default), or url: served for {cfg.url_ttl_s} s"
        )
        model: str | None = Field(None, max_length=200, description="GET /v1/models lists it")
        quality: Quality | None = Field(None, description="denoiser steps (see the README)")
        output_format: Literal["png", "jpeg", "webp"] | None = None
        output_compression: int | None = Field(None, ge=0, le=100)
        background: Literal["transparent", "opaque", "auto"] | None = None
        style: Literal["vivid", "natural"] | None = Field(None, description="ignored")
        moderation: Literal["low", "auto"] | None = Field(None, description="ignored")
        user: str | None = Field(None, max_length=256, description="ignored")
        safety_identifier: str | None = Field(None, max_length=256, description="ignored")
        partial_images: int | None = Field(None, ge=0, le=3, description="ignored")
        stream: bool | None = Field(None, description="streaming is not offered: false only")

        @field_validator("stream")
        @classmethod
        def no_stream(cls, value: bool | None) -> bool | None:
            if value:
                raise ValueError("streaming is not supported by this server")
            return value

        @field_validator("background")
        @classmethod
        def opaque(cls, value: str | None) -> str | None:
            if value == "transparent":
                raise ValueError("this model makes opaque images only")
            return value

    return ImageOptions


def image_models(
    cfg: ServerConfig, defaults: list[SamplingConfig], resolutions: list[int]
) -> dict[str, type[BaseModel]]:
    """The request models of the three routes: generations (JSON), edits and variations (the
    text fields of their multipart forms)."""
    options = options_model(cfg, defaults, resolutions)
    prompted = prompt_model(cfg)
    strength_field = Field(
        None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="image-to-image strength (default 0.7; 1 with a mask)",
    )

    class ImageGenerationRequest(prompted, options):  # type: ignore[misc, valid-type]
        model_config = ConfigDict(extra="forbid")

    class ImageEditFields(prompted, options):  # type: ignore[misc, valid-type]
        model_config = ConfigDict(extra="forbid")
        strength: float | None = strength_field
        input_fidelity: Literal["high", "low"] | None = Field(None, description="ignored")

    class ImageVariationFields(options):  # type: ignore[misc, valid-type]
        model_config = ConfigDict(extra="forbid")
        strength: float | None = strength_field

    return {
        "generations": ImageGenerationRequest,
        "edits": ImageEditFields,
        "variations": ImageVariationFields,
    }


def stages_for_size(size: str | None, resolutions: list[int]) -> int:
    """How many stages make ``size``; a ValueError naming the sizes offered otherwise."""
    if size in (None, "", "auto"):
        return len(resolutions)
    for k, r in enumerate(resolutions):
        if size == f"{r}x{r}":
            return k + 1
    offered = ", ".join(f"{r}x{r}" for r in resolutions)
    raise ValueError(f"size {size!r} is not made by this model; it makes {offered} (or auto)")


def steps_for_quality(
    quality: str | None, defaults: list[SamplingConfig], max_steps: int
) -> tuple[int, ...] | None:
    """Each stage's steps for ``quality`` (None: the stages' defaults)."""
    factor = QUALITY_STEPS.get(quality or "auto", 1.0)
    if factor == 1.0:
        return None
    return tuple(min(max_steps, max(1, math.ceil(d.steps * factor))) for d in defaults)


def encode(img: Image.Image, output_format: str | None, compression: int | None) -> bytes:
    """An image as PNG, JPEG or WebP bytes (``compression`` is the JPEG/WebP quality)."""
    kind = FORMATS[output_format or "png"][0]
    buf = io.BytesIO()
    if kind == "PNG":
        img.save(buf, kind)
    else:
        img.convert("RGB").save(buf, kind, quality=100 if compression is None else compression)
    return buf.getvalue()


class ImageStore:
    """Images answered by URL: each served for ``ttl_s`` seconds, at most ``max_bytes`` held
    (the oldest go first). Used from the event loop only."""

    def __init__(self, ttl_s: float, max_bytes: int) -> None:
        self.ttl_s, self.max_bytes = ttl_s, max_bytes
        self.items: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()
        self.size = 0

    def put(self, data: bytes, media_type: str, ext: str) -> str:
        """Keep ``data``; returns its file name (an unguessable token and the extension)."""
        self._expire()
        name = f"{secrets.token_urlsafe(24)}.{ext}"
        self.items[name] = (time.monotonic() + self.ttl_s, data, media_type)
        self.size += len(data)
        while self.size > self.max_bytes and len(self.items) > 1:
            self._drop(next(iter(self.items)))
        return name

    def get(self, name: str) -> tuple[bytes, str, float] | None:
        """(data, media type, seconds left), or None when unknown or expired."""
        self._expire()
        item = self.items.get(name)
        if item is None:
            return None
        return item[1], item[2], item[0] - time.monotonic()

    def _drop(self, name: str) -> None:
        self.size -= len(self.items.pop(name)[1])

    def _expire(self) -> None:
        now = time.monotonic()
        while self.items and next(iter(self.items.values()))[0] <= now:
            self._drop(next(iter(self.items)))


def created() -> int:
    return int(time.time())


def image_entry(data: bytes, url: str | None, seed: int) -> dict[str, Any]:
    """One entry of a response's ``data``: b64_json or url, and the seed (an extension)."""
    import base64

    if url is not None:
        return {"url": url, "seed": seed}
    return {"b64_json": base64.b64encode(data).decode("ascii"), "seed": seed}
