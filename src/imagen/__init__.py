"""imagen: cascaded text-to-image diffusion (Saharia et al. 2022) in PyTorch."""

from imagen.diffusion.guidance import ThresholdConfig
from imagen.diffusion.schedules import DiffusionConfig, NoiseSchedule
from imagen.models.cascade import Cascade, load_cascade
from imagen.models.stage import Edit, SamplingConfig, Stage, StageConfig
from imagen.models.unet import UNet, UNetConfig
from imagen.pipeline import ImagenPipeline
from imagen.text.encoders import TextEncoder, TextEncoderConfig, load_text_encoder

__version__ = "0.1.0"

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
