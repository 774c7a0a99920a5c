"""Network kinds: the registry of the networks a :class:`~imagen.models.stage.Stage` can run.

Every kind has a config type and a builder. The config implements :class:`NetworkConfig`
(``image_size``, ``in_channels`` (the image's), ``lowres_cond``, ``guidance_cond``,
``text_dim``, ``learned_variance``, ``check_sizes``); the built module is called as
``net(x, t, text, mask, lowres, aug_level[, guidance])`` and returns the prediction, with the
image's channels, then the variance interpolation where ``learned_variance`` is set. So the
stage, the samplers and the trainer never ask which kind they run.

Kinds:
- ``imagen``: the project's U-Net (models/unet.py).
- ``diffusers-unet``: diffusers' ``UNet2DConditionModel`` as DeepFloyd IF uses it
  (models/diffusers_unet.py; diffusers is imported only when one is built).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import nn

from imagen.models.config_ranges import check_unet_2d_condition
from imagen.models.limits import MAX_IMAGE_SIZE, MAX_WIDTH, check_range
from imagen.models.unet import UNet, UNetConfig
from imagen.utils.config import config_from_dict


@dataclass
class DiffusersUNetConfig:
    """A diffusers ``UNet2DConditionModel`` (DeepFloyd IF's network): its own config record
    (diffusers' ``unet/config.json``) and how the stage feeds it."""

    config: dict[str, Any] = field(default_factory=dict)  # UNet2DConditionModel's config
    image_channels: int = 3  # channels of the diffused tensor (images, or a VAE's latents)
    lowres_cond: bool = False  # super-resolution: input is cat[x_t, noisy upsampled low-res]
    guidance_cond: bool = False  # never: no guidance-distilled IF networks
    # SR: channels of the low-res image concatenated to x_t (None: image_channels; the x4
    # upscaler: 3 beside 4 latent channels)
    lowres_channels: int | None = None

    def __post_init__(self) -> None:
        c = self.config
        if not isinstance(c, dict) or not c:
            raise ValueError("a diffusers-unet stage needs the network's config record")
        # every field's type and range, wherever the record is parsed (models/config_ranges.py)
        check_unet_2d_condition(c, "config")
        for key in ("sample_size", "in_channels", "out_channels"):
            value = c.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"the diffusers U-Net config needs a positive {key}, got {value!r}"
                )
        if self.image_channels < 1:
            raise ValueError(f"image_channels must be positive, got {self.image_channels}")
        lowres = (self.lowres_channels or self.image_channels) if self.lowres_cond else 0
        if c["in_channels"] != self.image_channels + lowres:
            raise ValueError(
                f"a {'super-resolution' if self.lowres_cond else 'base'} stage with "
                f"{self.image_channels} image channels cannot take a {c['in_channels']}-channel input"
            )
        if c["out_channels"] not in (self.image_channels, 2 * self.image_channels):
            raise ValueError(f"{c['out_channels']} output channels: expected the image's or twice")
        if self.guidance_cond:
            raise ValueError("a diffusers-unet stage cannot take the guidance weight as an input")

    @property
    def image_size(self) -> int:
        return int(self.config["sample_size"])

    @property
    def in_channels(self) -> int:
        return self.image_channels

    @property
    def text_dim(self) -> int:
        return int(self.config.get("encoder_hid_dim") or self.config["cross_attention_dim"])

    @property
    def learned_variance(self) -> bool:
        """IF's stages output the variance interpolation after the image's channels."""
        return int(self.config["out_channels"]) == 2 * self.image_channels

    def check_sizes(self, source: str) -> None:
        """Raise unless the record's sizes, where it has them, are within models/limits.py."""
        c = self.config
        check_range(source, "unet.config.sample_size", c.get("sample_size", 1), 1, MAX_IMAGE_SIZE)
        widths = c.get("block_out_channels") or ()
        if isinstance(widths, list | tuple) and all(isinstance(w, int) for w in widths):
            check_range(source, "unet.config.block_out_channels", widths, 1, MAX_WIDTH)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class NetworkConfig(Protocol):
    """What every network kind's config declares, so that the stage, the samplers, the
    trainer and the model checks never ask which kind they run."""

    image_size: int  # side of the images (or latents) the network denoises
    in_channels: int  # channels of those images (an SR stage's input adds the low-res image's)
    lowres_cond: bool  # super-resolution: conditioned on the upsampled low-res image
    guidance_cond: bool  # takes the guidance weight as an input (guidance distillation)
    text_dim: int  # width of the text embeddings it reads

    @property
    def learned_variance(self) -> bool:
        """Whether the output has the variance interpolation after the prediction."""
        ...

    def check_sizes(self, source: str) -> None:
        """Raise a one-line ValueError naming ``source`` for sizes beyond models/limits.py."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """The config as the record a stage's config.json stores."""
        ...


@dataclass(frozen=True)
class NetworkKind:
    """A registered kind of network: how its config is read and how it is built."""

    name: str
    help: str
    config_type: type
    build: Callable[[Any], nn.Module]
    # the modules a LoRA adapts by default (PEFT target names: module-name suffixes)
    lora_targets: tuple[str, ...] = ()


def _build_diffusers(config: DiffusersUNetConfig) -> nn.Module:
    from imagen.models.diffusers_unet import DiffusersUNet  # imports diffusers: only here

    return DiffusersUNet(config)


NETWORKS: dict[str, NetworkKind] = {
    k.name: k
    for k in (
        NetworkKind(
            "imagen",
            "the project's U-Net (models/unet.py)",
            UNetConfig,
            UNet,
            ("to_q", "to_kv", "text_kv", "out"),  # its attention's projections
        ),
        NetworkKind(
            "diffusers-unet",
            "diffusers' UNet2DConditionModel as DeepFloyd IF uses it",
            DiffusersUNetConfig,
            _build_diffusers,
            # diffusers' DreamBooth LoRA script for IF: attention with added K/V
            ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"),
        ),
    )
}
"""Every network kind by name; a stage config's ``network`` is checked against it."""


def get_network(name: str) -> NetworkKind:
    """Look a network kind up by name (see :data:`NETWORKS`)."""
    try:
        return NETWORKS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown network kind {name!r}; choose one of {', '.join(NETWORKS)}"
        ) from None


def network_config(name: str, data: Any, where: str | None = None) -> Any:
    """The config of network kind ``name`` from its record (a dict, or already a config);
    ``where`` names it in error messages."""
    kind = get_network(name)
    if isinstance(data, kind.config_type):
        return data
    if not isinstance(data, dict):
        raise ValueError(
            f"{where or 'the network config'} must be a mapping, got {type(data).__name__}"
        )
    return config_from_dict(kind.config_type, data, where)
