"""The server's limits and its request and response schemas (built from the limits and from
the sampler registry, so the OpenAPI schema publishes every limit), and the one way an
uploaded image is read: its size checked from the header before it is decoded."""

import base64
import binascii
import io
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from imagen.data.images import to_rgb
from imagen.diffusion.samplers import sampler_names
from imagen.models.sampling import SamplingConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServerConfig:
    """Limits and queueing of the server; every limit is enforced and published in the
    OpenAPI schema."""

    host: str = "127.0.0.1"  # listen on loopback unless told otherwise
    port: int = 8000
    max_queue: int = 16  # requests waiting or running, at most; more get 429
    max_batch_images: int = 8  # images in one batched forward pass
    batch_wait_s: float = 0.02  # how long the worker waits to fill a batch
    max_prompt_chars: int = 300
    max_images: int = 4  # per request
    max_steps: int = 100
    max_guidance: float = 20.0
    max_body_bytes: int = 8_000_000  # request bodies, uploaded images included; more get 413
    max_image_side: int = 1024  # uploaded init images and masks, in pixels
    retry_after_s: int = 2
    url_ttl_s: int = 600  # how long an image answered by URL is served
    max_stored_bytes: int = 256_000_000  # images kept for URL answers; the oldest go first
    api_keys: tuple[str, ...] = ()  # when any, every route but health and the page needs one
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides the loopback names

    def limits(self) -> dict[str, Any]:
        """The published limits: everything but the keys and the host list."""
        return {k: v for k, v in asdict(self).items() if k not in ("api_keys", "allowed_hosts")}


def _named(what: str) -> str:
    return f"{what}: " if what else ""


def open_upload(raw: bytes, max_side: int, what: str = "") -> Image.Image:
    """An uploaded PNG, JPEG or WebP opened lazily (its header only), refused with a
    ValueError when it is not one or when the header claims a side over ``max_side``: a
    decompression bomb costs nothing. Decode it with :func:`decode_upload`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:  # Pillow's own limit, far above max_side
        raise ValueError(
            f"{_named(what)}too many pixels: the header claims over "
            f"{2 * Image.MAX_IMAGE_PIXELS // 1_000_000} megapixels (at most {max_side} px a side)"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ValueError(f"{_named(what)}not a PNG, JPEG or WebP image") from None
    if im.format not in ("PNG", "JPEG", "WEBP"):
        raise ValueError(f"{_named(what)}expected a PNG, JPEG or WebP image, got {im.format}")
    side = max(im.size)
    if side > max_side:
        w, h = im.size
        raise ValueError(
            f"{_named(what)}too many pixels: {w}x{h}, {side} px is larger than {max_side} px"
        )
    return im


def decode_upload(im: Image.Image, mode: str = "RGB", what: str = "") -> Image.Image:
    """The full decode of an image from :func:`open_upload` (slow for large images: run it off
    the event loop). RGB composites transparency on white; RGBA and L keep what they hold."""
    try:
        im.load()
        return to_rgb(im)[0] if mode == "RGB" else im.convert(mode)
    except (OSError, ValueError, SyntaxError, EOFError):
        raise ValueError(f"{_named(what)}damaged or truncated image data") from None


def b64_upload(data: str, max_side: int, what: str = "") -> Image.Image:
    """A base64 PNG, JPEG or WebP (optionally a ``data:`` URI) opened by :func:`open_upload`."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{_named(what)}not a base64-encoded PNG, JPEG or WebP image") from None
    return open_upload(raw, max_side, what)


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def stage_defaults(defaults: list[SamplingConfig], name: str) -> str:
    """'8, 6 and 4': each stage's default of ``name``, for the schema's descriptions."""
    values = [str(getattr(s, name)) for s in defaults]
    return ", ".join(values[:-1]) + " and " + values[-1] if len(values) > 1 else values[0]


def settings_model(cfg: ServerConfig, defaults: list[SamplingConfig]) -> type[BaseModel]:
    """The settings every generating route shares (the server's own API and the OpenAI one):
    negative prompt, steps, guidance, seed. Steps and guidance left out take each stage's
    stored default, the same settings as the command line."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        negative_prompt: str = Field(
            "", max_length=cfg.max_prompt_chars, description="what guidance steers away from"
        )
        steps: int = Field(
            None,
            ge=1,
            le=cfg.max_steps,
            description="denoiser steps of every stage; left out: each stage's default "
            f"({stage_defaults(defaults, 'steps')})",
            json_schema_extra=_no_default,
        )
        guidance: float = Field(
            None,
            ge=0.0,
            le=cfg.max_guidance,
            allow_inf_nan=False,
            description="guidance scale of every stage; left out: each stage's default "
            f"({stage_defaults(defaults, 'guidance')})",
            json_schema_extra=_no_default,
        )
        seed: int | None = Field(
            None, ge=0, le=2**62, description="seed of the first image; random if absent"
        )

    return Settings


def prompt_model(cfg: ServerConfig) -> type[BaseModel]:
    """A required, non-blank prompt of at most ``max_prompt_chars``."""

    class Prompted(BaseModel):
        prompt: str = Field(
            min_length=1, max_length=cfg.max_prompt_chars, description="text prompt"
        )

        @field_validator("prompt")
        @classmethod
        def not_blank(cls, value: str) -> str:
            if not value.strip():
                raise ValueError("must not be blank")
            return value

    return Prompted


def request_model(cfg: ServerConfig, defaults: list[SamplingConfig]) -> type[BaseModel]:
    """The schema of ``POST /v1/generate`` under the limits of ``cfg``; ``defaults`` are the
    stages' stored sampling settings (what a request that leaves a setting out gets)."""
    if isinstance(defaults, SamplingConfig):
        defaults = [defaults]
    sampler_type = Literal[sampler_names()]  # type: ignore[valid-type]
    image_chars = cfg.max_body_bytes  # base64 text, bounded by the body limit

    class GenerateRequest(prompt_model(cfg), settings_model(cfg, defaults)):  # type: ignore[misc]
        model_config = ConfigDict(extra="forbid")

        num_images: int = Field(1, ge=1, le=cfg.max_images)
        sampler: sampler_type = Field(  # type: ignore[valid-type]
            None,
            description="sampler of every stage; left out: each stage's default "
            f"({stage_defaults(defaults, 'sampler')})",
            json_schema_extra=_no_default,
        )
        client_id: str | None = Field(
            None, max_length=64, description="key for GET /v1/progress/{client_id}"
        )
        init_image: str | None = Field(
            None,
            max_length=image_chars,
            description=f"base64 PNG/JPEG for image-to-image, at most {cfg.max_image_side} px",
        )
        strength: float = Field(
            0.7, ge=0.0, le=1.0, allow_inf_nan=False, description="image-to-image strength"
        )
        mask: str | None = Field(
            None, max_length=image_chars, description="base64 PNG inpainting mask, white = redo"
        )

        @field_validator("init_image", "mask")
        @classmethod
        def an_image(cls, value: str | None, info: ValidationInfo) -> str | None:
            """Checked from the header only: the decode runs off the event loop."""
            if value is None:
                return None
            if info.field_name == "mask" and info.data.get("init_image") is None:
                raise ValueError("needs init_image (a valid one)")
            b64_upload(value, cfg.max_image_side)
            return value

    return GenerateRequest


class ImageOut(BaseModel):
    png_base64: str
    seed: int
    width: int
    height: int


class GenerateResponse(BaseModel):
    prompt: str
    images: list[ImageOut]
    settings: dict[str, Any]
    batch_size: int
    seconds: float
    warnings: list[str] = []  # e.g. words of the prompt the model never saw in training
