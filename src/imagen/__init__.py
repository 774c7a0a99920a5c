"""imagen: cascaded text-to-image diffusion (Saharia et al. 2022) in PyTorch.

The public names below are imported on first use (module ``__getattr__``), so that
``import imagen`` and the ``imagen`` command line start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imagen.diffusion.guidance import ThresholdConfig
    from imagen.diffusion.schedules import DiffusionConfig, NoiseSchedule
    from imagen.models.cascade import Cascade, load_cascade
    from imagen.models.sampling import SamplingConfig
    from imagen.models.stage import Edit, Stage, StageConfig
    from imagen.models.unet import UNet, UNetConfig
    from imagen.pipeline import ImagenPipeline
    from imagen.text.encoders import TextEncoder, TextEncoderConfig, load_text_encoder

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "Cascade": "imagen.models.cascade",
    "DiffusionConfig": "imagen.diffusion.schedules",
    "Edit": "imagen.models.stage",
    "ImagenPipeline": "imagen.pipeline",
    "NoiseSchedule": "imagen.diffusion.schedules",
    "SamplingConfig": "imagen.models.sampling",
    "Stage": "imagen.models.stage",
    "StageConfig": "imagen.models.stage",
    "TextEncoder": "imagen.text.encoders",
    "TextEncoderConfig": "imagen.text.encoders",
    "ThresholdConfig": "imagen.diffusion.guidance",
    "UNet": "imagen.models.unet",
    "UNetConfig": "imagen.models.unet",
    "load_cascade": "imagen.models.cascade",
    "load_text_encoder": "imagen.text.encoders",
}
"""Each public name and the module it comes from."""

__all__ = [
    "Cascade",
    "DiffusionConfig",
    "Edit",
    "ImagenPipeline",
    "NoiseSchedule",
    "SamplingConfig",
    "Stage",
    "StageConfig",
    "TextEncoder",
    "TextEncoderConfig",
    "ThresholdConfig",
    "UNet",
    "UNetConfig",
    "load_cascade",
    "load_text_encoder",
]


if sorted(__all__) != sorted(_LAZY):  # pragma: no cover - a name added to one list only
    raise ImportError("imagen.__all__ and imagen._LAZY name different things")


def __getattr__(name: str) -> Any:
    """Import a public name's module the first time the name is used."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'imagen' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
