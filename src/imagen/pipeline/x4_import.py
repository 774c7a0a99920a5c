"""The Stable Diffusion x4 upscaler (diffusers' ``StableDiffusionUpscalePipeline``) as a latent
super-resolution stage, for ``imagen import``.

DeepFloyd never released its own stage III; its documentation chains this upscaler after IF
stage II at ``noise_level=100``. The stage diffuses the VAE's 4-channel latents at the low-res
image's own size (its U-Net takes ``cat[latents, noisy low-res image]``, 7 channels, and the
noise level as a class label) and its VAE decodes them x4. Its schedules are the pipeline's:
``scaled_linear`` betas (1e-4 to 0.02 over 1000 steps) with v-prediction, sampled with DDIM
("leading" spacing, ``steps_offset`` 1, ending at alpha_bar[0] as ``set_alpha_to_one=False``
does), and the low-res image noised by the same DDPM schedule at an integer noise level.
Defaults: 75 steps, guidance 9, noise level 100 (DeepFloyd's), thresholding off (latents are
not bounded like images). It conditions on its own CLIP text model (OpenCLIP ViT-H cut to its
penultimate layer), so the cascade holds a second text encoder for this stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imagen.diffusion.guidance import ThresholdConfig
from imagen.diffusion.schedules import DiffusionConfig
from imagen.models.model_dir import WeightsFile
from imagen.models.networks import DiffusersUNetConfig
from imagen.models.sampling import SamplingConfig
from imagen.models.spaces import SpaceConfig
from imagen.models.stage_config import StageConfig
from imagen.pipeline.import_checks import read_config, trusted_root
from imagen.pipeline.x4_checks import check_x4, new_name
from imagen.text.encoders import TextEncoderConfig
from imagen.utils.config import load_json_file

UPSCALE = "StableDiffusionUpscalePipeline"
X4_NOISE_LEVEL = 100  # DeepFloyd's documentation: stage II -> x4 at noise_level 100
X4_LOWRES = 256  # the x4 upscaler imported alone takes 256 px images (1024 px out)
X4_SCALING_FACTOR = 0.08333  # what diffusers' pipeline forces when the VAE config lacks one
X4_LICENCE = (
    "The Stable Diffusion x4 upscaler's weights are licensed under the CreativeML Open "
    "RAIL++-M License (use restrictions in its Attachment A; see the source's LICENSE and "
    "model card). This model directory links to them: do not redistribute it with the weights."
)


def _config(root: Path, *parts: str) -> dict[str, Any]:
    """A config of the pipeline at ``root``: a regular file inside it, read bounded."""
    return read_config(root.joinpath(*parts), trusted_root(root))


def _schedule(root: Path) -> DiffusionConfig:
    """The diffusion of the upscaler's DDIM scheduler; its low-res noising scheduler must be
    the same schedule (the stage noises the low-res image with its own)."""
    main = _config(root, "scheduler", "scheduler_config.json")
    low = _config(root, "low_res_scheduler", "scheduler_config.json")
    want = {"beta_schedule": "scaled_linear", "prediction_type": "v_prediction"}
    for key, value in want.items():
        if main.get(key) != value:
            raise ValueError(f"{root / 'scheduler'}: {key} is {main.get(key)!r}, not {value!r}")
    shared = ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps")
    for key in shared:
        if low.get(key, main.get(key)) != main.get(key):
            raise ValueError(
                f"{root / 'low_res_scheduler'}: {key} {low.get(key)!r} differs from the "
                f"scheduler's {main.get(key)!r}"
            )
    return DiffusionConfig(
        schedule="scaled_linear",
        timesteps=int(main.get("num_train_timesteps", 1000)),
        target="v",
        linear_beta_start=float(main.get("beta_start", 0.0001)),
        linear_beta_end=float(main.get("beta_end", 0.02)),
        float32_alphas=True,
    )


def _sampling(root: Path, max_noise_level: int) -> SamplingConfig:
    sched = _config(root, "scheduler", "scheduler_config.json")
    if sched.get("timestep_spacing", "leading") != "leading":
        raise ValueError(f"{root / 'scheduler'}: only leading timestep spacing is supported")
    return SamplingConfig(
        sampler="ddim",
        steps=75,
        guidance=9.0,
        threshold=ThresholdConfig(mode="none"),
        aug_level=X4_NOISE_LEVEL / 999,
        max_aug_level=max_noise_level / 999,
        precision="bf16",
        eta=0.0,
        spacing="leading",
        spacing_offset=int(sched.get("steps_offset", 0)),
        final_alpha="one" if sched.get("set_alpha_to_one", True) else "first",
    )


def x4_stage_config(root: Path, lowres_size: int | None) -> StageConfig:
    """The latent SR stage of the upscaler at ``root``, taking ``lowres_size`` px images (the
    stage below's, or :data:`X4_LOWRES` for the upscaler alone)."""
    index = _config(root, "model_index.json")
    unet = dict(_config(root, "unet", "config.json"))
    vae = _config(root, "vae", "config.json")
    size = lowres_size or X4_LOWRES
    unet["sample_size"] = size  # the network is convolutional: it runs at the input's size
    space = SpaceConfig(
        kind="vae", config=vae, scaling_factor=float(vae.get("scaling_factor") or X4_SCALING_FACTOR)
    )
    latent = int(vae.get("latent_channels", 4))
    return StageConfig(
        unet=DiffusersUNetConfig(
            config=unet, image_channels=latent, lowres_cond=True, lowres_channels=3
        ),
        diffusion=_schedule(root),
        sampling=_sampling(root, int(index.get("max_noise_level", 350))),
        lowres_size=size,
        network="diffusers-unet",
        space=space,
        lowres_noise_first=True,
    )


def x4_text_encoder(root: Path) -> TextEncoderConfig:
    """The upscaler's own CLIP text model and tokenizer (77 tokens, every position kept)."""
    for part in ("text_encoder", "tokenizer"):
        if not (root / part).is_dir():
            raise FileNotFoundError(f"{root} has no {part}/ (the x4 upscaler's CLIP text model)")
    tok = (
        load_json_file(root / "tokenizer" / "tokenizer_config.json", "tokenizer config")
        if (root / "tokenizer" / "tokenizer_config.json").is_file()
        else {}
    )
    length = tok.get("model_max_length", 77) if isinstance(tok, dict) else 77
    length = int(length) if isinstance(length, int) and 1 <= length <= 512 else 77
    return TextEncoderConfig(
        name=str(root / "text_encoder"),
        max_length=length,
        padding="max_length",
        tokenizer=str(root / "tokenizer"),
        kind="clip",
    )


@dataclass
class X4Weights:
    """The upscaler's network weights (linked) and its VAE's (linked, or renamed and copied
    when the file still uses diffusers' old attention names)."""

    unet: WeightsFile
    vae: WeightsFile | dict[str, torch.Tensor]


def x4_weights(root: Path, variant: str | None, copy: bool) -> X4Weights:
    """The weights files of the upscaler at ``root``, every part checked first
    (pipeline/x4_checks.py)."""
    from safetensors import safe_open

    unet_path, vae_path = check_x4(root, variant)
    unet = WeightsFile(unet_path, copy)
    with safe_open(str(vae_path), "pt") as f:
        names = list(f.keys())
    if all(new_name(n) == n for n in names):
        return X4Weights(unet, WeightsFile(vae_path, copy))
    from imagen.utils.tensors import load_tensors

    renamed = {}
    for name, tensor in load_tensors(vae_path).items():
        if new_name(name) != name and tensor.ndim == 4:  # old 1x1-conv attention projections
            tensor = tensor[:, :, 0, 0]
        renamed[new_name(name)] = tensor
    return X4Weights(unet, renamed)
