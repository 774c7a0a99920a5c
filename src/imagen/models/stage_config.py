"""A stage's configuration: its network, its diffusion, where it diffuses, its text encoder
and its sampling defaults (the record a stage directory's config.json holds)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from imagen.diffusion.schedules import DiffusionConfig
from imagen.models.networks import network_config
from imagen.models.sampling import SamplingConfig
from imagen.models.spaces import SpaceConfig
from imagen.models.unet import UNetConfig
from imagen.utils.config import config_from_dict


@dataclass
class StageConfig:
    """One stage of the cascade: its U-Net, its diffusion and its sampling defaults."""

    # the network's config, of the kind ``network`` names (models/networks.py): a UNetConfig
    # for the project's U-Net, a DiffusersUNetConfig for an imported DeepFloyd IF stage
    unet: Any = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    lowres_size: int | None = None  # SR stages: the resolution of the stage below
    text_encoder: dict[str, Any] = field(default_factory=dict)  # name, dim, max_length
    network: str = "imagen"  # a kind in imagen.models.networks.NETWORKS
    lowres_align_corners: bool = False  # SR stages: upsample the low-res image as IF does
    # where the stage diffuses: pixels, or a VAE's latents (models/spaces.py)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    # SR stages: draw the low-res image's augmentation noise before x_T (diffusers'
    # StableDiffusionUpscalePipeline) instead of after it (DeepFloyd IF's pipelines)
    lowres_noise_first: bool = False

    def __post_init__(self) -> None:
        self.unet = network_config(self.network, self.unet, "StageConfig.unet")
        if isinstance(self.diffusion, dict):
            self.diffusion = config_from_dict(DiffusionConfig, self.diffusion)
        if isinstance(self.sampling, dict):
            self.sampling = config_from_dict(SamplingConfig, self.sampling)
        if isinstance(self.space, dict):
            self.space = config_from_dict(SpaceConfig, self.space, "StageConfig.space")
        if (self.lowres_size is not None) != self.unet.lowres_cond:
            raise ValueError(
                "a super-resolution stage needs both lowres_size and unet.lowres_cond; "
                "a base stage needs neither"
            )

    @property
    def resolution(self) -> int:
        """The side of the images the stage makes (its space decodes to)."""
        return self.unet.image_size * self.space.factor

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """The shape of one diffused sample (an image, or a VAE's latents)."""
        n = self.unet.image_size
        return (self.unet.in_channels, n, n)

    @property
    def lowres_shape(self) -> tuple[int, int, int]:
        """SR stages: the shape of the low-res image as it enters the network (upsampled to
        the diffused size) and of its augmentation noise."""
        c, n, _ = self.sample_shape
        return (self.space.image_channels(c), n, n)

    @property
    def is_super_resolution(self) -> bool:
        return self.lowres_size is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageConfig:
        return config_from_dict(cls, data)


def fine_tuned_config(config: StageConfig) -> StageConfig:
    """The config a stage is trained under: the loss trains the prediction only, so a stage
    that sampled with its learned variance (an imported IF stage) samples with the fixed
    posterior variance after training, and records so."""
    s = config.sampling
    if s.ddpm_variance != "learned_range":
        return config
    return replace(config, sampling=replace(s, ddpm_variance="posterior"))
