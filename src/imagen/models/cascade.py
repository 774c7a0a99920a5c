"""The cascade: a frozen text encoder and an ordered list of separately trained stages
(a base model, then super-resolution models), sampled text -> base image -> each SR stage.

A model directory holds ``model_index.json`` (the text encoder and the stage order) and, per
stage, ``config.json`` and ``model.safetensors``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imagen.diffusion.guidance import Conditioning, Denoiser, ThresholdConfig, make_denoiser
from imagen.diffusion.samplers import Generators, get_sampler, randn
from imagen.diffusion.schedules import DiffusionConfig, NoiseSchedule, respaced_timesteps
from imagen.models.unet import UNet, UNetConfig, config_from_dict
from imagen.text.encoders import TextEmbedding, TextEncoder, check_encoder_matches
from imagen.utils.tensors import dequantize, load_strict, load_tensors, quantize_int8, save_tensors

INDEX_FILE = "model_index.json"
FORMAT = "imagen-cascade"


@dataclass
class SamplingConfig:
    """How a stage is sampled by default; every field can be overridden per call."""

    sampler: str = "dpmpp"  # ddpm | ddim | dpmpp
    steps: int = 20  # number of denoiser evaluations (respaced timesteps)
    guidance: float = 3.0  # classifier-free guidance scale (1 = no guidance)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    aug_level: float = 0.2  # SR stages: noise-augmentation level of the low-res input, in [0, 1)
    eta: float = 0.0  # DDIM only: 0 deterministic, 1 ancestral
    ddpm_variance: str = "posterior"  # DDPM only: posterior variance or beta_t

    def __post_init__(self) -> None:
        if isinstance(self.threshold, dict):
            self.threshold = ThresholdConfig(**self.threshold)
        get_sampler(self.sampler)  # raises on an unknown name
        if self.ddpm_variance not in ("posterior", "beta"):
            raise ValueError(f"ddpm_variance must be posterior or beta, got {self.ddpm_variance!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")
        if not 0.0 <= self.aug_level < 1.0:
            raise ValueError(f"aug_level must be in [0, 1), got {self.aug_level}")


@dataclass
class StageConfig:
    """One stage of the cascade: its U-Net, its diffusion and its sampling defaults."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    lowres_size: int | None = None  # SR stages: the resolution of the stage below
    text_encoder: dict[str, Any] = field(default_factory=dict)  # name, dim, max_length

    def __post_init__(self) -> None:
        if isinstance(self.unet, dict):
            self.unet = UNetConfig.from_dict(self.unet)
        if isinstance(self.diffusion, dict):
            self.diffusion = config_from_dict(DiffusionConfig, self.diffusion)
        if isinstance(self.sampling, dict):
            self.sampling = config_from_dict(SamplingConfig, self.sampling)
        if (self.lowres_size is not None) != self.unet.lowres_cond:
            raise ValueError(
                "a super-resolution stage needs both lowres_size and unet.lowres_cond; "
                "a base stage needs neither"
            )

    @property
    def resolution(self) -> int:
        return self.unet.image_size

    @property
    def is_super_resolution(self) -> bool:
        return self.lowres_size is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageConfig:
        return config_from_dict(cls, data)


def resize(images: Tensor, size: int) -> Tensor:
    """Resize a batch of images: area averaging down, bilinear up (no-op at equal size)."""
    if images.shape[-1] == size:
        return images
    if images.shape[-1] > size:
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def augment_lowres(
    lowres: Tensor,
    size: int,
    level: Tensor,
    schedule: NoiseSchedule,
    noise: Tensor,
) -> tuple[Tensor, Tensor]:
    """Noise-conditioning augmentation (Imagen sec. 2.5): upsample the low-res image to the
    stage's size and diffuse it to augmentation level ``level`` in [0, 1) (per sample, as a
    fraction of the schedule; 0 leaves it clean) with ``noise`` (shaped like the output).
    Returns the corrupted image and the timestep the U-Net is conditioned on."""
    up = resize(lowres, size)
    t = (level * (schedule.num_timesteps - 1)).round().long().to(up.device)
    noised = schedule.q_sample(up, t, noise.to(up.dtype))
    return torch.where(t.view(-1, 1, 1, 1) > 0, noised, up), t.float()


class Stage(nn.Module):
    """A trained U-Net with its schedule and sampling defaults."""

    def __init__(self, config: StageConfig) -> None:
        super().__init__()
        self.config = config
        self.unet = UNet(config.unet)
        self.schedule = NoiseSchedule(config.diffusion)
        self.compiled: Callable[..., Tensor] | None = None  # set by imagen.pipeline.compile_unets

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @torch.no_grad()
    def sample(
        self,
        text: TextEmbedding,
        lowres: Tensor | None = None,
        sampling: SamplingConfig | None = None,
        generator: Generators = None,
        autocast_dtype: torch.dtype | None = None,
        callback: Callable[[int, Tensor], None] | None = None,
        edit: Edit | None = None,
    ) -> Tensor:
        """Sample images in [-1, 1] for a batch of encoded captions (and, for SR stages, the
        low-res images to upsample); ``edit`` turns this into image-to-image or inpainting."""
        s = sampling or self.config.sampling
        device = self.device
        b, n, c = text.tokens.shape[0], self.config.resolution, self.config.unet.in_channels
        cond = Conditioning(text.tokens.to(device), text.mask.to(device))
        if self.config.is_super_resolution:
            if lowres is None:
                raise ValueError("a super-resolution stage needs the low-res images to upsample")
            level = torch.full((b,), s.aug_level, device=device)
            noise = randn((b, c, n, n), generator, device)
            cond.lowres, cond.aug_level = augment_lowres(
                lowres.to(device).float(), n, level, self.schedule, noise
            )
        net = self.compiled or self.unet
        denoise = make_denoiser(net, self.schedule, cond, s.guidance, s.threshold, autocast_dtype)
        timesteps = respaced_timesteps(self.schedule.num_timesteps, s.steps)
        x = randn((b, c, n, n), generator, device)
        if edit is not None:
            image = resize(edit.image.to(device).float(), n).expand(b, -1, -1, -1)
            run = round(edit.strength * len(timesteps))
            if run == 0:
                return image.clone()
            if run < len(timesteps):  # SDEdit: start part-way, from the noised input
                timesteps = timesteps[-run:]
                x = self.schedule.q_sample(image, torch.full((b,), timesteps[0], device=device), x)
            if edit.mask is not None:
                denoise = _keep_known(denoise, image, edit.mask.to(device).float(), n)
        kwargs: dict[str, Any] = {"generator": generator, "callback": callback}
        if s.sampler == "ddim":
            kwargs["eta"] = s.eta
        elif s.sampler == "ddpm":
            kwargs["variance"] = s.ddpm_variance
        return get_sampler(s.sampler)(denoise, x, timesteps, self.schedule.alpha_bar, **kwargs)


@dataclass
class Edit:
    """Image-to-image (SDEdit, Meng et al. 2022) and inpainting inputs for a stage."""

    image: Tensor  # (1 or B, C, H, W) in [-1, 1], any resolution (resized to the stage's)
    strength: float = 1.0  # fraction of the sampling steps to run; 0 returns the image
    mask: Tensor | None = None  # (1 or B, 1, H, W): 1 = regenerate, 0 = keep the image

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")


def _keep_known(denoise: Denoiser, image: Tensor, mask: Tensor, size: int) -> Denoiser:
    """Inpainting by replacement in x0 space: the known region of x0_hat is the input image at
    every step, so each sampler's final step (which lands on x0_hat) keeps it exactly."""
    m = F.interpolate(mask, size=(size, size), mode="nearest").clamp(0, 1)

    def inpaint(x: Tensor, t: int) -> Tensor:
        return m * denoise(x, t) + (1 - m) * image

    return inpaint


def check_stage_chain(configs: list[StageConfig]) -> None:
    """A cascade starts with a base stage and each SR stage upsamples the stage below it."""
    if not configs:
        raise ValueError("a cascade needs at least one stage")
    if configs[0].is_super_resolution:
        raise ValueError("the first stage of a cascade must be a base (non-SR) stage")
    for i, (lo, hi) in enumerate(zip(configs[:-1], configs[1:], strict=True), start=1):
        if hi.lowres_size != lo.resolution:
            raise ValueError(
                f"stage {i} upsamples from {hi.lowres_size} px but stage {i - 1} "
                f"makes {lo.resolution} px images"
            )


class Cascade(nn.Module):
    """A text encoder and its stages, base first. Stages are trained independently and
    assembled here; each stage's text-encoder record must match the encoder."""

    def __init__(self, text_encoder: TextEncoder, stages: list[Stage]) -> None:
        super().__init__()
        check_stage_chain([s.config for s in stages])
        for st in stages:
            if st.config.text_encoder:
                check_encoder_matches(st.config.text_encoder, text_encoder)
        self.text_encoder = text_encoder
        self.stages = nn.ModuleList(stages)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str] | TextEmbedding,
        sampling: list[SamplingConfig] | None = None,
        generator: Generators = None,
        autocast_dtype: torch.dtype | None = None,
        return_all_stages: bool = False,
        progress: Callable[[int, int, int], None] | None = None,
        edit: Edit | None = None,
    ) -> list[Tensor]:
        """Run the whole cascade for ``prompts`` (or their embeddings), one image each; returns
        each stage's images in [-1, 1] (only the last unless ``return_all_stages``).
        ``progress(stage, step, steps)`` is called after every denoiser step; ``edit`` applies
        image-to-image or inpainting at every stage."""
        text = prompts if isinstance(prompts, TextEmbedding) else self.text_encoder.encode(prompts)
        outs: list[Tensor] = []
        images: Tensor | None = None
        for k, st in enumerate(self.stages):
            s = sampling[k] if sampling is not None else st.config.sampling

            def cb(i: int, _x: Tensor, k: int = k, steps: int = s.steps) -> None:
                if progress is not None:
                    progress(k, i + 1, steps)

            images = st.sample(text, images, s, generator, autocast_dtype, cb, edit).clamp(-1, 1)
            outs.append(images)
        return outs if return_all_stages else outs[-1:]

    # ---- model directories -------------------------------------------------------------
    def save(self, directory: str | Path, dtype: torch.dtype | None = torch.float16) -> None:
        """Write the cascade as a model directory (weights in safetensors, fp16 by default)."""
        save_model_dir(
            directory,
            self.text_encoder.config(),
            [s.config for s in self.stages],
            [s.unet.state_dict() for s in self.stages],
            dtype,
        )


def save_model_dir(
    directory: str | Path,
    text_encoder: dict[str, Any],
    configs: list[StageConfig],
    states: list[dict[str, Tensor]],
    dtype: torch.dtype | None = torch.float16,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model_index.json`` and one sub-directory per stage; ``dtype`` is the weights'
    storage type: float16 (default), bfloat16, float32, or int8 (weight-only, per channel)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for k, (cfg, state) in enumerate(zip(configs, states, strict=True)):
        name = f"stage{k}"
        d = root / name
        d.mkdir(exist_ok=True)
        cfg = replace(cfg, text_encoder=dict(text_encoder))
        (d / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if dtype == torch.int8:
            save_tensors(quantize_int8(state), d / "model.safetensors")
        else:
            save_tensors(state, d / "model.safetensors", dtype)
        names.append(name)
    index = {"format": FORMAT, "version": 1, "text_encoder": text_encoder, "stages": names}
    index.update(extra or {})
    (root / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return root


def read_index(directory: str | Path) -> dict[str, Any]:
    """Read and validate a model directory's index."""
    root = Path(directory)
    path = root / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not an imagen model directory (no {INDEX_FILE})")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if index.get("format") != FORMAT or not index.get("stages"):
        raise ValueError(f"{path} is not an {FORMAT} index")
    return index


def load_stage(directory: str | Path, device: str | torch.device = "cpu") -> Stage:
    """Load one stage directory (config.json + model.safetensors), strictly."""
    d = Path(directory)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{d} has no config.json")
    stage = Stage(StageConfig.from_dict(json.loads(cfg_path.read_text())))
    state = dequantize(load_tensors(d / "model.safetensors"))
    load_strict(stage.unet, state, str(d / "model.safetensors"))
    return stage.to(device).eval()


def load_cascade(
    directory: str | Path,
    device: str | torch.device = "cpu",
    text_encoder: TextEncoder | None = None,
    text_dtype: torch.dtype | None = None,
) -> Cascade:
    """Load a model directory; the text encoder is the one recorded there unless given."""
    from imagen.text.encoders import TextEncoderConfig, load_text_encoder

    root = Path(directory)
    index = read_index(root)
    te = index["text_encoder"]
    if text_encoder is None:
        text_encoder = load_text_encoder(
            TextEncoderConfig(name=te["name"], max_length=int(te["max_length"])), device, text_dtype
        )
    stages = [load_stage(root / name, device) for name in index["stages"]]
    return Cascade(text_encoder, stages)
