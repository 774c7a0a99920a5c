"""The ``diffusers-unet`` network kind: diffusers' ``UNet2DConditionModel`` behind the stage's
network signature (see models/networks.py). It is a subclass, so its parameter names, and
so the weights files, are diffusers' own: an imported DeepFloyd IF stage uses the published
``diffusion_pytorch_model.safetensors`` as it is."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor, nn


def _init_config(config: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of a config record (diffusers' private keys dropped)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


class DiffusersUNet(UNet2DConditionModel):
    """A ``UNet2DConditionModel`` called as ``net(x, t, text, mask, lowres, aug_level)``:
    an SR stage's input is ``cat[x_t, lowres]`` and its noise-augmentation timestep goes in as
    the class label, as in DeepFloyd IF (a timestep embedding) and the Stable Diffusion x4
    upscaler (an embedding table of integer noise levels). All text positions reach the network (IF conditions
    on all 77 T5 outputs, padding included), so the mask is not used here."""

    casts_inputs = True  # inputs go to the weights' dtype: bf16 weights compute in bf16

    def __init__(self, config: Any = None, **kwargs: Any) -> None:
        """Built by the registry from a ``DiffusersUNetConfig`` (models/networks.py)."""
        if config is not None:
            kwargs = _init_config(config.config)
        super().__init__(**kwargs)

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        t: Tensor,
        text: Tensor,
        mask: Tensor | None = None,
        lowres: Tensor | None = None,
        aug_level: Tensor | None = None,
    ) -> Tensor:
        del mask
        # bf16 weights take bf16 inputs, unless they are computed in float32 (utils/lowmem.py)
        dtype = getattr(self, "compute_dtype", None) or self.dtype
        if lowres is not None:
            x = torch.cat([x, lowres], dim=1)
        if aug_level is not None and isinstance(self.class_embedding, nn.Embedding):
            aug_level = aug_level.round().long()  # the x4 upscaler: noise levels as class ids
        out = super().forward(
            x.to(dtype),
            t,
            encoder_hidden_states=text.to(dtype),
            class_labels=aug_level,
            return_dict=False,
        )[0]
        return out.float()
