"""imagen: cascaded text-to-image diffusion (Saharia et al. 2022) in PyTorch."""

from .cascade import Cascade, Edit, SamplingConfig, Stage, StageConfig, load_cascade
from .guidance import ThresholdConfig
from .pipeline import ImagenPipeline
from .schedules import DiffusionConfig, NoiseSchedule
from .text_encoders import TextEncoder, TextEncoderConfig, load_text_encoder
from .unet import UNet, UNetConfig

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
