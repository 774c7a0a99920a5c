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
from dataclasses import dataclass, replace

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
    NoiseSchedule,
    clipped_start,
    respaced_timesteps,
)
from imagen.models.lowres import augment_lowres, blur_lowres, resize
from imagen.models.networks import get_network
from imagen.models.sampling import SamplingConfig
from imagen.models.spaces import get_space
from imagen.models.stage_config import StageConfig
from imagen.text.encoders import TextEmbedding, pad_embeddings, unpad_embeddings
from imagen.utils.system import autocast as autocast_to


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
        # where it diffuses (models/spaces.py): nothing for pixels, a frozen VAE for latents
        self.space = get_space(config.space.kind).build(config.space)
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
        ``drop`` is True) and, for super-resolution stages, the low-res images resized to the
        size the network runs at (the stage's resolution; a latent stage's latent size) and
        noise-augmented to ``aug_level`` (fractions in [0, 1)) with ``aug_noise``."""
        device = self.device
        cond = Conditioning(text.tokens.to(device), text.mask.to(device), null_text=self.null_text)
        if drop is not None:
            cond = cond.dropped(drop.to(device))
        if self.config.is_super_resolution:
            if lowres is None or aug_level is None or aug_noise is None:
                raise ValueError("a super-resolution stage needs the low-res images to upsample")
            cond.lowres, cond.aug_level = augment_lowres(
                lowres.to(device).float(),
                self.config.unet.image_size,
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
        conditioning (and optional blur) augmentation of the real low-res images. A latent
        stage diffuses the frozen VAE's latents of ``images``. A network with a learned variance
        is trained on its prediction alone (see :func:`fine_tuned_config`)."""
        draws = draws.to(images.device)
        lowres = draws.lowres(images, self.config.lowres_size)
        cond = self.condition(text, lowres, draws.aug_level, draws.aug_noise, draws.drop)
        x0 = self.space.encode(images)
        xt = self.schedule.q_sample(x0, draws.t, draws.noise)
        target = self.schedule.target(x0, draws.noise, draws.t)
        pred = self.forward(xt, draws.t, cond, autocast, net)[:, : x0.shape[1]]
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
        threshold = sampling.threshold  # thresholding keeps images in range: off for latents
        if not self.config.space.bounded:
            threshold = replace(threshold, mode="none")
        return make_denoiser(
            self.compiled or self.unet,
            self.schedule,
            cond,
            scale,  # type: ignore[arg-type]
            threshold,
            autocast,
            uncond,
            learned_variance=self.config.unet.learned_variance,
        )

    def timesteps(self, sampling: SamplingConfig) -> list[int]:
        """The descending training timesteps ``sampling`` visits on this stage's schedule."""
        start = clipped_start(self.schedule.alpha_bar, sampling.lambda_min)
        return respaced_timesteps(
            self.schedule.num_timesteps,
            sampling.steps,
            sampling.spacing,
            start,
            sampling.spacing_offset,
        )

    def _initial_noise(self, b: int, generator: Generators) -> tuple[Tensor, Tensor | None]:
        """x_T and, for SR stages, the augmentation level and noise of the low-res image, in
        the order the stage's reference pipeline draws them."""
        device, s = self.device, self.config
        if not s.is_super_resolution:
            return randn((b, *s.sample_shape), generator, device), None
        first, second = s.sample_shape, s.lowres_shape
        if s.lowres_noise_first:
            first, second = second, first
        a, z = randn((b, *first), generator, device), randn((b, *second), generator, device)
        return (z, a) if s.lowres_noise_first else (a, z)

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
        ``autocast_dtype`` overrides the config's precision. A latent stage samples its
        space's latents and decodes them."""
        s = sampling or self.config.sampling
        device = self.device
        autocast_dtype = autocast_dtype or s.autocast_dtype(device)
        b = text.tokens.shape[0]
        x, aug_noise = self._initial_noise(b, generator)
        level = None if aug_noise is None else torch.full((b,), s.aug_level, device=device)
        text, negative = _same_length(text, negative)
        cond = self.condition(text, lowres, level, aug_noise)
        uncond = None
        if negative is not None:
            uncond = cond.with_text(negative.tokens.to(device), negative.mask.to(device))
        denoise = self.denoiser(cond, s, autocast_dtype, uncond)
        timesteps = self.timesteps(s)
        if edit is not None:
            x, timesteps, denoise, done = self._edit(edit, x, timesteps, denoise)
            if done is not None:
                return done
        at = at or Progress(stage=0, stages=1, step=0, steps=0, batch_size=b, images_total=b)
        at = replace(at, steps=len(timesteps))
        final = 1.0 if s.final_alpha == "one" else float(self.schedule.alpha_bar[0])
        x = get_sampler(s.sampler)(
            denoise,
            x,
            timesteps,
            self.schedule.alpha_bar,
            generator=generator,
            callback=step_callback(progress, at),
            final=final,
            **s.sampler_options(),
        )
        return self.space.decode(x)

    def _edit(
        self, edit: Edit, x: Tensor, timesteps: list[int], denoise: Denoiser
    ) -> tuple[Tensor, list[int], Denoiser, Tensor | None]:
        """Image-to-image (start part-way, from the noised input) and inpainting (keep the
        known region) in the stage's space; the last item is the result when nothing runs."""
        b, n, device = x.shape[0], self.config.unet.image_size, x.device
        image = resize(edit.image.to(device).float(), self.config.resolution)
        image = self.space.encode(image).expand(b, -1, -1, -1)
        run = round(edit.strength * len(timesteps))
        if run == 0:
            return x, timesteps, denoise, self.space.decode(image.clone())
        if run < len(timesteps):  # SDEdit: start part-way, from the noised input
            timesteps = timesteps[-run:]
            x = self.schedule.q_sample(image, torch.full((b,), timesteps[0], device=device), x)
        if edit.mask is not None:
            denoise = _keep_known(denoise, image, edit.mask.to(device).float(), n)
        return x, timesteps, denoise, None


def _same_length(
    text: TextEmbedding, negative: TextEmbedding | None
) -> tuple[TextEmbedding, TextEmbedding | None]:
    """The prompts' and negative prompts' embeddings padded to one length (they are guided in
    one batch)."""
    if negative is None or negative.tokens.shape[1] == text.tokens.shape[1]:
        return text, negative
    b = text.tokens.shape[0]
    both = pad_embeddings(unpad_embeddings(text) + unpad_embeddings(negative))
    return TextEmbedding(both.tokens[:b], both.mask[:b]), TextEmbedding(
        both.tokens[b:], both.mask[b:]
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
