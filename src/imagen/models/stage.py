"""One stage of the cascade: a U-Net with its noise schedule, its conditioning, its loss and
its sampler settings.

:class:`Stage` is the one owner of how the U-Net is conditioned and called (as NVlabs/edm's
preconditioning wrapper owns its loss): training (:meth:`Stage.loss`) and sampling
(:meth:`Stage.sample`) both build the conditioning with :meth:`Stage.condition` (text tokens,
the null caption, the noise-augmented low-res image of super-resolution stages) and run the
network through :meth:`Stage.forward`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imagen.diffusion.denoiser import Denoiser, Prediction
from imagen.diffusion.guidance import Conditioning, guided_output, make_denoiser, model_output
from imagen.diffusion.samplers import (
    Generators,
    Progress,
    ProgressCallback,
    get_sampler,
    randn,
    step_callback,
)
from imagen.diffusion.schedules import (
    DiffusionConfig,
    NoiseSchedule,
    clipped_start,
    respaced_timesteps,
)
from imagen.models.networks import get_network, network_config
from imagen.models.sampling import SamplingConfig
from imagen.models.unet import UNetConfig, config_from_dict
from imagen.text.encoders import TextEmbedding, pad_embeddings, unpad_embeddings
from imagen.utils.system import autocast as autocast_to


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

    def __post_init__(self) -> None:
        self.unet = network_config(self.network, self.unet, "StageConfig.unet")
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


def fine_tuned_config(config: StageConfig) -> StageConfig:
    """The config a stage is trained under: the loss trains the prediction only, so a stage
    that sampled with its learned variance (an imported IF stage) samples with the fixed
    posterior variance after training, and records so."""
    s = config.sampling
    if s.ddpm_variance != "learned_range":
        return config
    return replace(config, sampling=replace(s, ddpm_variance="posterior"))


def resize(images: Tensor, size: int, align_corners: bool = False) -> Tensor:
    """Resize a batch of images: area averaging down, bilinear up (no-op at equal size);
    ``align_corners`` for the upsampling DeepFloyd IF's super-resolution uses."""
    if images.shape[-1] == size:
        return images
    if images.shape[-1] > size:
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=align_corners)


def augment_lowres(
    lowres: Tensor,
    size: int,
    level: Tensor,
    schedule: NoiseSchedule,
    noise: Tensor,
    align_corners: bool = False,
) -> tuple[Tensor, Tensor]:
    """Noise-conditioning augmentation (Imagen sec. 2.5): upsample the low-res image to the
    stage's size and diffuse it to augmentation level ``level`` in [0, 1) (per sample, as a
    fraction of the schedule; 0 leaves it clean) with ``noise`` (shaped like the output).
    Returns the corrupted image and the timestep the U-Net is conditioned on."""
    up = resize(lowres, size, align_corners)
    t = (level * (schedule.num_timesteps - 1)).round().long().to(up.device)
    noised = schedule.q_sample(up, t, noise.to(up.dtype))
    return torch.where(t.view(-1, 1, 1, 1) > 0, noised, up), t.float()


BLUR_RADIUS = 4  # taps each side of the low-res blur kernel (enough for sigma <= 1.5)
BLUR_MAX = 1.5  # the largest blur sigma, in low-res pixels, the kernel represents


def blur_lowres(images: Tensor, sigma: Tensor) -> Tensor:
    """Blur augmentation of the low-res conditioning image (Ho et al. 2021, Cascaded Diffusion
    Models, sec. 3.2): a separable Gaussian of standard deviation ``sigma`` (B,) in low-res
    pixels per sample (0 leaves a sample as it is), edges replicated. Training only: a stage
    learns to draw crisp detail from a softer low-res image than its training data's."""
    b, c, h, w = images.shape
    k = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, device=images.device, dtype=torch.float32)
    s = sigma.to(images.device, torch.float32).clamp_min(1e-3).view(b, 1)
    kernel = torch.exp(-0.5 * (k.view(1, -1) / s) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(images.dtype)
    kernel = kernel.repeat_interleave(c, 0)  # (B C, K): one kernel per sample and channel
    x = F.pad(images.reshape(1, b * c, h, w), (BLUR_RADIUS,) * 4, mode="replicate")
    x = F.conv2d(x, kernel.view(b * c, 1, 1, -1), groups=b * c)
    x = F.conv2d(x, kernel.view(b * c, 1, -1, 1), groups=b * c)
    return x.view(b, c, h, w)


@dataclass
class TrainingDraws:
    """Every random draw of one training batch (see :meth:`Stage.loss`)."""

    t: Tensor  # (B,) training timesteps
    noise: Tensor  # (B, C, H, W)
    drop: Tensor  # (B,) bool: replace the caption by the null condition
    aug_level: Tensor | None = None  # (B,) SR augmentation level in [0, aug_max); None for base
    aug_noise: Tensor | None = None  # (B, C, H, W); None for base stages
    u: Tensor | None = None  # (B, K) uniform draws in [0, 1) that distillation objectives use
    blur: Tensor | None = None  # (B,) SR low-res blur sigma in low-res pixels; None: no blur

    def _fields(self) -> tuple[Tensor | None, ...]:
        return (self.t, self.noise, self.drop, self.aug_level, self.aug_noise, self.u, self.blur)

    def lowres(self, images: Tensor, size: int | None) -> Tensor | None:
        """The low-res conditioning images of a training batch of ``images``: downsampled to
        ``size`` (None for a base stage), then blurred where the draws say."""
        if size is None:
            return None
        lowres = resize(images, size)
        return lowres if self.blur is None else blur_lowres(lowres, self.blur)

    def to(self, device: torch.device) -> TrainingDraws:
        return TrainingDraws(
            *(None if x is None else x.to(device, non_blocking=True) for x in self._fields())
        )


class Stage(nn.Module):
    """A U-Net with its schedule and sampling defaults: the conditioning, the network call, the
    training loss and sampling of one cascade stage."""

    def __init__(self, config: StageConfig) -> None:
        super().__init__()
        self.config = config
        self.unet = get_network(config.network).build(config.unet)
        self.schedule = NoiseSchedule(config.diffusion)
        self.compiled: Callable[..., Tensor] | None = None  # set by imagen.pipeline.compile_unets
        # the null caption's (tokens (L, D), mask (L,)) where the model has one (DeepFloyd IF:
        # the encoded empty prompt, stored with the stage); None: zeroed text, empty mask
        self.null_text: tuple[Tensor, Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ---- conditioning and the network call (shared by training and sampling) -------------
    def condition(
        self,
        text: TextEmbedding,
        lowres: Tensor | None = None,
        aug_level: Tensor | None = None,
        aug_noise: Tensor | None = None,
        drop: Tensor | None = None,
    ) -> Conditioning:
        """The U-Net's conditioning for a batch: the text tokens (the null caption where
        ``drop`` is True) and, for super-resolution stages, the low-res images upsampled to
        this stage's size and noise-augmented to ``aug_level`` (fractions in [0, 1)) with
        ``aug_noise``."""
        device = self.device
        cond = Conditioning(text.tokens.to(device), text.mask.to(device), null_text=self.null_text)
        if drop is not None:
            cond = cond.dropped(drop.to(device))
        if self.config.is_super_resolution:
            if lowres is None or aug_level is None or aug_noise is None:
                raise ValueError("a super-resolution stage needs the low-res images to upsample")
            cond.lowres, cond.aug_level = augment_lowres(
                lowres.to(device).float(),
                self.config.resolution,
                aug_level.to(device),
                self.schedule,
                aug_noise.to(device),
                self.config.lowres_align_corners,
            )
        return cond

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        cond: Conditioning,
        autocast: torch.dtype | None = None,
        net: Callable[..., Tensor] | None = None,
    ) -> Tensor:
        """The U-Net's prediction (the stage's target) for noisy images ``x`` at timesteps
        ``t`` under ``cond``, with optional autocast; ``net`` replaces the U-Net (a compiled or
        DDP-wrapped version of it)."""
        net = net or self.compiled or self.unet
        with autocast_to(x.device.type, autocast):
            return model_output(net, x, t.float(), cond)

    # ---- training ------------------------------------------------------------------------
    def loss(
        self,
        images: Tensor,
        text: TextEmbedding,
        draws: TrainingDraws,
        autocast: torch.dtype | None = None,
        net: Callable[..., Tensor] | None = None,
    ) -> Tensor:
        """The weighted denoising loss of one batch (Ho et al. 2020 eq. 14, with the stage's
        target and loss weighting), with conditioning dropout and, for SR stages, noise-
        conditioning (and optional blur) augmentation of the real low-res images. A network with a learned
        variance is trained on its prediction alone (see :func:`fine_tuned_config`)."""
        draws = draws.to(images.device)
        lowres = draws.lowres(images, self.config.lowres_size)
        cond = self.condition(text, lowres, draws.aug_level, draws.aug_noise, draws.drop)
        xt = self.schedule.q_sample(images, draws.t, draws.noise)
        target = self.schedule.target(images, draws.noise, draws.t)
        pred = self.forward(xt, draws.t, cond, autocast, net)[:, : images.shape[1]]
        return self.weighted_loss(pred, target, draws.t)

    def weighted_loss(self, pred: Tensor, target: Tensor, t: Tensor) -> Tensor:
        """Mean over the batch of each sample's squared error, weighted per timestep by the
        stage's loss weighting."""
        per_sample = (pred.float() - target).pow(2).flatten(1).mean(1)
        return (self.schedule.loss_weight(t) * per_sample).mean()

    # ---- sampling ------------------------------------------------------------------------
    def guidance_inputs(
        self, cond: Conditioning, scale: float | Tensor
    ) -> tuple[Conditioning, float | Tensor]:
        """How guidance at ``scale`` (one weight, or one per sample) reaches this stage's
        network: a guidance-distilled U-Net takes the weight as an input and runs one pass
        (scale 1); any other runs classifier-free guidance at ``scale``."""
        if not self.config.unet.guidance_cond:
            return cond, scale
        b, device = cond.text.shape[0], cond.text.device
        weight = (
            scale if isinstance(scale, Tensor) else torch.full((b,), float(scale), device=device)
        )
        return replace(cond, guidance=weight), 1.0

    def guided_output(
        self,
        x: Tensor,
        t: Tensor,
        cond: Conditioning,
        scale: float | Tensor,
        autocast: torch.dtype | None = None,
    ) -> Tensor:
        """The network's guided prediction (the stage's target, unthresholded) at per-sample
        timesteps ``t``: what a distillation student learns from its teacher."""
        cond, scale = self.guidance_inputs(cond, scale)
        with autocast_to(x.device.type, autocast):
            out = guided_output(self.compiled or self.unet, x, t.float(), cond, scale)
        return out.float()

    def denoiser(
        self,
        cond: Conditioning,
        sampling: SamplingConfig,
        autocast: torch.dtype | None = None,
        uncond: Conditioning | None = None,
    ) -> Denoiser:
        """This stage as a denoiser ``(x_t, t) -> Prediction`` with guidance (away from the
        null caption, or from ``uncond``) and thresholding. A guidance-distilled U-Net takes
        the guidance weight as an input and runs one pass per step."""
        if uncond is not None and self.config.unet.guidance_cond:
            raise ValueError("a guidance-distilled stage cannot steer away from a negative prompt")
        cond, scale = self.guidance_inputs(cond, sampling.guidance)
        return make_denoiser(
            self.compiled or self.unet,
            self.schedule,
            cond,
            scale,  # type: ignore[arg-type]
            sampling.threshold,
            autocast,
            uncond,
            learned_variance=self.config.unet.learned_variance,
        )

    def timesteps(self, sampling: SamplingConfig) -> list[int]:
        """The descending training timesteps ``sampling`` visits on this stage's schedule."""
        start = clipped_start(self.schedule.alpha_bar, sampling.lambda_min)
        return respaced_timesteps(
            self.schedule.num_timesteps, sampling.steps, sampling.spacing, start
        )

    @torch.no_grad()
    def sample(
        self,
        text: TextEmbedding,
        lowres: Tensor | None = None,
        sampling: SamplingConfig | None = None,
        generator: Generators = None,
        autocast_dtype: torch.dtype | None = None,
        progress: ProgressCallback | None = None,
        edit: Edit | None = None,
        negative: TextEmbedding | None = None,
        at: Progress | None = None,
    ) -> Tensor:
        """Sample images in [-1, 1] for a batch of encoded captions (and, for SR stages, the
        low-res images to upsample); ``edit`` turns this into image-to-image or inpainting;
        ``negative`` (one embedding per image) replaces the null caption in guidance.
        ``progress`` gets ``at`` (by default this stage alone) after every step; when it
        returns False, :class:`~imagen.diffusion.samplers.Cancelled` is raised.
        ``autocast_dtype`` overrides the config's precision."""
        s = sampling or self.config.sampling
        device = self.device
        autocast_dtype = autocast_dtype or s.autocast_dtype(device)
        b, n, c = text.tokens.shape[0], self.config.resolution, self.config.unet.in_channels
        x = randn((b, c, n, n), generator, device)  # drawn first, then the augmentation noise
        level = aug_noise = None
        if self.config.is_super_resolution:
            level = torch.full((b,), s.aug_level, device=device)
            aug_noise = randn((b, c, n, n), generator, device)
        if negative is not None and negative.tokens.shape[1] != text.tokens.shape[1]:
            both = pad_embeddings(unpad_embeddings(text) + unpad_embeddings(negative))
            text = TextEmbedding(both.tokens[:b], both.mask[:b])
            negative = TextEmbedding(both.tokens[b:], both.mask[b:])
        cond = self.condition(text, lowres, level, aug_noise)
        uncond = None
        if negative is not None:
            uncond = cond.with_text(negative.tokens.to(device), negative.mask.to(device))
        denoise = self.denoiser(cond, s, autocast_dtype, uncond)
        timesteps = self.timesteps(s)
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
        at = at or Progress(stage=0, stages=1, step=0, steps=0, batch_size=b, images_total=b)
        at = replace(at, steps=len(timesteps))
        return get_sampler(s.sampler)(
            denoise,
            x,
            timesteps,
            self.schedule.alpha_bar,
            generator=generator,
            callback=step_callback(progress, at),
            **s.sampler_options(),
        )


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

    def inpaint(x: Tensor, t: int) -> Prediction:
        p = denoise(x, t)
        return replace(p, x0=m * p.x0 + (1 - m) * image)

    return inpaint
