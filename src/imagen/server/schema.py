"""The server's limits and its request and response schemas (built from the limits and from
the sampler registry, so the OpenAPI schema publishes every limit)."""

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from imagen.diffusion.samplers import sampler_names
from imagen.models.stage import SamplingConfig


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


def decode_image(data: str, mode: str = "RGB") -> Image.Image:
    """A base64 PNG or JPEG (optionally a ``data:`` URI) as a PIL image; ValueError if not."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            if im.format not in ("PNG", "JPEG", "WEBP"):
                raise ValueError(f"expected a PNG, JPEG or WebP image, got {im.format}")
            return im.convert(mode)
    except (binascii.Error, UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise ValueError("not a base64-encoded PNG, JPEG or WebP image") from None


def request_model(cfg: ServerConfig, defaults: SamplingConfig) -> type[BaseModel]:
    """The schema of ``POST /v1/generate`` under the limits of ``cfg``."""
    sampler_type = Literal[sampler_names()]  # type: ignore[valid-type]
    image_chars = cfg.max_body_bytes  # base64 text, bounded by the body limit

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        prompt: str = Field(
            min_length=1, max_length=cfg.max_prompt_chars, description="text prompt"
        )
        negative_prompt: str = Field(
            "", max_length=cfg.max_prompt_chars, description="what guidance steers away from"
        )
        num_images: int = Field(1, ge=1, le=cfg.max_images)
        guidance: float = Field(defaults.guidance, ge=0.0, le=cfg.max_guidance, allow_inf_nan=False)
        steps: int = Field(defaults.steps, ge=1, le=cfg.max_steps)
        sampler: sampler_type = defaults.sampler  # type: ignore[valid-type]
        seed: int | None = Field(
            None, ge=0, le=2**62, description="seed of the first image; random if absent"
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

        @field_validator("prompt")
        @classmethod
        def not_blank(cls, value: str) -> str:
            if not value.strip():
                raise ValueError("must not be blank")
            return value

        @field_validator("init_image", "mask")
        @classmethod
        def an_image(cls, value: str | None, info: ValidationInfo) -> str | None:
            if value is None:
                return None
            if info.field_name == "mask" and info.data.get("init_image") is None:
                raise ValueError("needs init_image (a valid one)")
            size = max(decode_image(value).size)
            if size > cfg.max_image_side:
                raise ValueError(f"{size} px is larger than {cfg.max_image_side} px")
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
