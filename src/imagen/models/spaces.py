"""Where a stage diffuses: the registry of spaces.

A stage denoises either the images themselves (``pixels``) or a VAE's latents (``vae``: the
Stable Diffusion x4 upscaler's 4-channel latents, a quarter of the image's side, decoded x4
by diffusers' ``AutoencoderKL``). A :class:`SpaceConfig` in the stage config names the kind;
the module its kind builds encodes training images into the space, decodes samples back to
images, and says the geometry (how much smaller the space is, how many channels it has,
whether its values are bounded like images so that thresholding applies). Only
:class:`~imagen.models.stage.Stage` asks it; nothing else knows which space a stage runs in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

SPACE_WEIGHTS = "space.safetensors"  # a stage directory's weights of its space (the VAE)


@dataclass
class SpaceConfig:
    """Where a stage diffuses: the kind (a name in :data:`SPACES`) and its record."""

    kind: str = "pixels"  # pixels | vae
    # vae: diffusers' AutoencoderKL config record (its config.json)
    config: dict[str, Any] = field(default_factory=dict)
    scaling_factor: float = 1.0  # latents are the VAE's means times this (x4: 0.08333)
    tile: int = 0  # vae: decode in tiles of this many latent pixels (0: whole, as diffusers)

    def __post_init__(self) -> None:
        kind = get_space(self.kind)
        if not isinstance(self.config, dict):
            raise ValueError("space.config must be a mapping")
        if not 0 < self.scaling_factor < 1e3:
            raise ValueError(
                f"space.scaling_factor must be in (0, 1000), got {self.scaling_factor}"
            )
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 0:
            raise ValueError(f"space.tile must be a non-negative integer, got {self.tile!r}")
        kind.check(self)

    @property
    def factor(self) -> int:
        """How many image pixels one pixel of the space decodes to, per side."""
        return get_space(self.kind).factor(self)

    def image_channels(self, diffused_channels: int) -> int:
        """The channels of the images this space holds (pixel space: the diffused tensor's;
        a VAE: its input's)."""
        return get_space(self.kind).image_channels(self) or diffused_channels

    @property
    def bounded(self) -> bool:
        """Values lie in the images' range [-1, 1], so thresholding applies."""
        return get_space(self.kind).bounded

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PixelSpace(nn.Module):
    """The images themselves: nothing to encode or decode."""

    def weights(self) -> nn.Module | None:
        """The module whose weights the stage directory stores beside the network's: none."""
        return None

    def encode(self, images: Tensor) -> Tensor:
        return images

    def decode(self, x: Tensor) -> Tensor:
        return x


class VAESpace(nn.Module):
    """A frozen ``AutoencoderKL``'s latent space (diffusers; imported only when built). Latents
    are the encoder's means times ``scaling_factor`` (deterministic, so training draws stay a
    function of the sample index); decoding runs in float32 whatever the stage's precision
    (the x4's VAE gives NaN in fp16), with memory-efficient attention (PyTorch's fused CPU and
    GPU kernels never build the score matrix), and in overlapping tiles when ``tile`` is set."""

    def __init__(self, config: SpaceConfig) -> None:
        super().__init__()
        from diffusers import AutoencoderKL

        record = {k: v for k, v in config.config.items() if not k.startswith("_")}
        self.vae = AutoencoderKL(**record).eval().requires_grad_(False)
        self.scaling_factor = config.scaling_factor
        self.tile = config.tile
        self.factor = config.factor

    def train(self, mode: bool = True) -> VAESpace:  # frozen: always in eval mode
        return super().train(False)

    def weights(self) -> nn.Module:
        """The VAE, whose weights (diffusers' own names) are the stage's space.safetensors."""
        return self.vae

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        vae = self.vae
        moments = vae.encode(images.to(vae.dtype)).latent_dist
        return moments.mean.float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        vae = self.vae
        vae.use_tiling = bool(self.tile) and x.shape[-1] > self.tile
        if vae.use_tiling:
            vae.tile_latent_min_size = self.tile
            vae.tile_sample_min_size = self.tile * self.factor
        z = (x / self.scaling_factor).to(vae.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return vae.decode(z, return_dict=False)[0].float()


def _vae_check(config: SpaceConfig) -> None:
    c = config.config
    widths = c.get("block_out_channels")
    if not isinstance(widths, list | tuple) or not 1 <= len(widths) <= 8:
        raise ValueError("space.config needs the VAE's block_out_channels (1 to 8 levels)")
    latent = c.get("latent_channels", 4)
    if isinstance(latent, bool) or not isinstance(latent, int) or not 1 <= latent <= 64:
        raise ValueError(f"space.config.latent_channels must be 1 to 64, got {latent!r}")


@dataclass(frozen=True)
class SpaceKind:
    """A registered space: its module, its geometry and its checks."""

    name: str
    help: str
    build: Callable[[SpaceConfig], nn.Module]
    factor: Callable[[SpaceConfig], int]
    image_channels: Callable[[SpaceConfig], int | None]  # None: the diffused tensor's
    bounded: bool  # values in [-1, 1]: thresholding applies
    check: Callable[[SpaceConfig], None] = lambda config: None


SPACES: dict[str, SpaceKind] = {
    k.name: k
    for k in (
        SpaceKind(
            "pixels",
            "the images themselves",
            lambda c: PixelSpace(),
            lambda c: 1,
            lambda c: None,
            True,
        ),
        SpaceKind(
            "vae",
            "a frozen AutoencoderKL's latents (the Stable Diffusion x4 upscaler's)",
            VAESpace,
            lambda c: 2 ** (len(c.config["block_out_channels"]) - 1),
            lambda c: int(c.config.get("in_channels", 3)),
            False,
            _vae_check,
        ),
    )
}
"""Every space by name; a stage config's ``space.kind`` is checked against it."""


def get_space(name: str) -> SpaceKind:
    """Look a space kind up by name (see :data:`SPACES`)."""
    try:
        return SPACES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown space {name!r}; choose one of {', '.join(SPACES)}") from None
