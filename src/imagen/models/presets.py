"""Named stage configurations: the paper-sized cascade, the bundled Shapes cascade and tiny
models for tests. Paper presets can be built on the meta device to count their parameters
without allocating them (see :func:`count_preset_parameters`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from imagen.diffusion.schedules import DiffusionConfig
from imagen.models.sampling import SamplingConfig
from imagen.models.stage import Stage, StageConfig
from imagen.models.unet import UNetConfig, count_parameters

T5_XXL_DIM = 4096


def paper_base64() -> StageConfig:
    """Imagen's 64 px base model (about 2B parameters): a width-512 U-Net with three blocks per
    level and text in the self-attention at 32, 16 and 8 px, conditioned on T5-XXL."""
    return StageConfig(
        unet=UNetConfig(
            image_size=64,
            channels=512,
            channel_mults=(1, 2, 3, 4),
            num_res_blocks=(3, 3, 3, 2),
            attn_resolutions=(32, 16, 8),
            attn_head_dim=64,
            text_dim=T5_XXL_DIM,
        ),
        diffusion=DiffusionConfig(schedule="cosine"),
        sampling=SamplingConfig(guidance=8.0, steps=50),
    )


def paper_sr256() -> StageConfig:
    """Imagen's 64 -> 256 Efficient U-Net (about 600M parameters): more blocks at low
    resolution, scaled skips, downsampling first; text self-attention at the lowest level."""
    return StageConfig(
        unet=UNetConfig(
            image_size=256,
            channels=128,
            channel_mults=(1, 2, 4, 8, 8),
            num_res_blocks=(2, 4, 8, 4, 2),
            attn_resolutions=(8,),
            attn_head_dim=64,
            text_dim=T5_XXL_DIM,
            lowres_cond=True,
            downsample_first=True,
            scale_skip=True,
        ),
        diffusion=DiffusionConfig(schedule="cosine"),
        sampling=SamplingConfig(guidance=8.0, steps=50, aug_level=0.2),
        lowres_size=64,
    )


def paper_sr1024() -> StageConfig:
    """Imagen's 256 -> 1024 Efficient U-Net (about 400M parameters): no self-attention, text
    cross-attention at the lowest level, linear schedule (paper appendix F)."""
    return StageConfig(
        unet=UNetConfig(
            image_size=1024,
            channels=128,
            channel_mults=(1, 2, 4, 8, 8),
            num_res_blocks=(2, 2, 2, 2, 2),
            attn_resolutions=(),
            cross_attn_resolutions=(32,),
            attn_head_dim=64,
            text_dim=T5_XXL_DIM,
            lowres_cond=True,
            downsample_first=True,
            scale_skip=True,
        ),
        diffusion=DiffusionConfig(schedule="linear"),
        sampling=SamplingConfig(guidance=8.0, steps=50, aug_level=0.2),
        lowres_size=256,
    )


def _shapes_diffusion() -> DiffusionConfig:
    """v-prediction with min-SNR weighting: stable and fast to train at small scale."""
    return DiffusionConfig(schedule="cosine", target="v", loss_weighting="min_snr")


def _shapes_sampling() -> SamplingConfig:
    """The bundled cascade's defaults: 20 DPM-Solver++ steps, guidance 3, SR augmentation 0.2."""
    return SamplingConfig(sampler="dpmpp", steps=20, guidance=3.0, aug_level=0.2)


def shapes_base32(text_dim: int = 384) -> StageConfig:
    """Base stage of the bundled Shapes cascade (32 px)."""
    return StageConfig(
        unet=UNetConfig(
            image_size=32,
            channels=32,
            channel_mults=(1, 2, 4),
            num_res_blocks=(1, 1, 1),
            attn_resolutions=(16, 8),
            text_dim=text_dim,
        ),
        diffusion=_shapes_diffusion(),
        sampling=_shapes_sampling(),
    )


def shapes_sr64(text_dim: int = 384) -> StageConfig:
    """32 -> 64 super-resolution stage of the bundled Shapes cascade."""
    return StageConfig(
        unet=UNetConfig(
            image_size=64,
            channels=24,
            channel_mults=(1, 2, 4),
            num_res_blocks=(1, 1, 2),
            attn_resolutions=(8,),
            text_dim=text_dim,
            lowres_cond=True,
            downsample_first=True,
            scale_skip=True,
        ),
        diffusion=_shapes_diffusion(),
        sampling=_shapes_sampling(),
        lowres_size=32,
    )


def shapes_sr128(text_dim: int = 384) -> StageConfig:
    """64 -> 128 super-resolution stage of the bundled Shapes cascade (text by cross-attention
    only, like the paper's last stage)."""
    return StageConfig(
        unet=UNetConfig(
            image_size=128,
            channels=16,
            channel_mults=(1, 2, 4, 4),
            num_res_blocks=(1, 1, 1, 2),
            attn_resolutions=(),
            cross_attn_resolutions=(8,),
            text_dim=text_dim,
            lowres_cond=True,
            downsample_first=True,
            scale_skip=True,
        ),
        diffusion=_shapes_diffusion(),
        sampling=_shapes_sampling(),
        lowres_size=64,
    )


def tiny_base(size: int = 16, text_dim: int = 32) -> StageConfig:
    """A few-thousand-parameter base stage for tests."""
    return StageConfig(
        unet=UNetConfig(
            image_size=size,
            channels=16,
            channel_mults=(1, 2),
            num_res_blocks=(1, 1),
            attn_resolutions=(size // 2,),
            attn_head_dim=8,
            text_dim=text_dim,
            norm_groups=8,
        ),
        sampling=SamplingConfig(steps=4, guidance=2.0),
    )


def tiny_sr(lowres: int = 16, text_dim: int = 32) -> StageConfig:
    """A tiny 2x super-resolution stage for tests (Efficient U-Net options on)."""
    size = 2 * lowres
    return StageConfig(
        unet=UNetConfig(
            image_size=size,
            channels=8,
            channel_mults=(1, 2),
            num_res_blocks=(1, 1),
            attn_resolutions=(),
            cross_attn_resolutions=(size // 4,),
            attn_head_dim=8,
            text_dim=text_dim,
            norm_groups=8,
            lowres_cond=True,
            downsample_first=True,
            scale_skip=True,
        ),
        sampling=SamplingConfig(steps=4, guidance=2.0, aug_level=0.2),
        lowres_size=lowres,
    )


PRESETS: dict[str, Callable[[], StageConfig]] = {
    "paper-base64": paper_base64,
    "paper-sr256": paper_sr256,
    "paper-sr1024": paper_sr1024,
    "shapes-base32": shapes_base32,
    "shapes-sr64": shapes_sr64,
    "shapes-sr128": shapes_sr128,
    "tiny-base": tiny_base,
    "tiny-sr": tiny_sr,
}


def get_preset(name: str) -> StageConfig:
    """A fresh copy of the named stage preset."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def count_preset_parameters(config: StageConfig) -> int:
    """Parameter count of a stage's U-Net, built on the meta device (no memory allocated)."""
    with torch.device("meta"):
        stage = Stage(config)
    return count_parameters(stage.unet)
