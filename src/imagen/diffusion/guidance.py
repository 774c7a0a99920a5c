"""Turning a trained U-Net into a denoiser ``x_t, t -> x0_hat`` for the samplers:
classifier-free guidance in one batched forward pass, and static or dynamic thresholding."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from imagen.diffusion.denoiser import Denoiser, Prediction
from imagen.diffusion.schedules import NoiseSchedule
from imagen.utils.system import autocast

ThresholdMode = Literal["dynamic", "static", "none"]


@dataclass
class ThresholdConfig:
    """How x0_hat is kept in the data range at each sampling step (Imagen sec. 2.3)."""

    mode: ThresholdMode = "dynamic"  # dynamic (the paper's), static (clip to [-1, 1]) or none
    percentile: float = 0.995  # p of dynamic thresholding: s = quantile_p(|x0_hat|)
    max_scale: float | None = None  # optional upper cap on s (DeepFloyd IF uses 1.5 / 1.0)

    def __post_init__(self) -> None:
        if self.mode not in ("dynamic", "static", "none"):
            raise ValueError(f"threshold mode must be dynamic, static or none, got {self.mode!r}")
        if not 0.0 < self.percentile <= 1.0:
            raise ValueError(f"threshold percentile must be in (0, 1], got {self.percentile}")
        if self.max_scale is not None and self.max_scale < 1.0:
            raise ValueError(f"threshold max_scale must be >= 1, got {self.max_scale}")

    def override(self, value: float | str) -> ThresholdConfig:
        """This thresholding changed by a caller's ``value``: a percentile sets dynamic
        thresholding at it, a mode name (dynamic, static, none) sets that mode."""
        if isinstance(value, str):
            return replace(self, mode=value)
        return replace(self, mode="dynamic", percentile=value)

    def summary(self) -> float | str:
        """How a run records it: the percentile when dynamic, else the mode."""
        return self.percentile if self.mode == "dynamic" else self.mode


def dynamic_threshold(
    x0: Tensor, percentile: float = 0.995, max_scale: float | None = None
) -> Tensor:
    """Imagen's dynamic thresholding: per sample, s = max(1, quantile_p(|x0|)); clip x0 to
    [-s, s] and divide by s. In-range samples (s = 1) are left untouched."""
    flat = x0.detach().float().abs().flatten(1)
    s = torch.quantile(flat, percentile, dim=1).clamp(min=1.0)
    if max_scale is not None:
        s = s.clamp(max=max_scale)
    s = s.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def apply_threshold(x0: Tensor, config: ThresholdConfig) -> Tensor:
    """Apply the configured thresholding to x0_hat."""
    if config.mode == "dynamic":
        return dynamic_threshold(x0, config.percentile, config.max_scale)
    if config.mode == "static":
        return x0.clamp(-1.0, 1.0)
    return x0


@dataclass
class Conditioning:
    """Everything the U-Net is conditioned on besides x_t and t, for one batch."""

    text: Tensor  # (B, L, D) token embeddings
    mask: Tensor  # (B, L) bool, True for real tokens
    lowres: Tensor | None = None  # (B, C, H, W) upsampled, noise-augmented low-res image (SR)
    aug_level: Tensor | None = None  # (B,) augmentation timestep of ``lowres`` (SR)
    guidance: Tensor | None = None  # (B,) guidance weight, for guidance-distilled U-Nets
    # the null caption's embedding (L, D) and mask (L,) where a model has one (DeepFloyd IF:
    # the encoded empty prompt); None: zeroed text with an empty mask
    null_text: tuple[Tensor, Tensor] | None = None

    def with_text(self, text: Tensor, mask: Tensor) -> Conditioning:
        """The same image conditioning with other text (a negative prompt's)."""
        return Conditioning(text, mask, self.lowres, self.aug_level, self.guidance, self.null_text)

    def null_tokens(self) -> tuple[Tensor, Tensor]:
        """The null caption shaped like this batch's text: the model's null embedding
        (padded or cut to the batch's length) or zeros with an empty mask (Ho & Salimans 2022)."""
        if self.null_text is None:
            return torch.zeros_like(self.text), torch.zeros_like(self.mask)
        tokens, mask = self.null_text
        b, length = self.mask.shape
        tokens = tokens[:length].to(self.text.device, self.text.dtype)
        mask = mask[:length].to(self.mask.device)
        pad = length - tokens.shape[0]
        if pad > 0:
            tokens = torch.cat([tokens, tokens.new_zeros(pad, tokens.shape[1])])
            mask = torch.cat([mask, mask.new_zeros(pad)])
        return tokens.expand(b, -1, -1), mask.expand(b, -1)

    def null(self) -> Conditioning:
        """The unconditional counterpart: the null caption for every sample."""
        return self.with_text(*self.null_tokens())

    def dropped(self, drop: Tensor) -> Conditioning:
        """The null caption where ``drop`` (B,) is True (conditioning dropout in training)."""
        tokens, mask = self.null_tokens()
        return self.with_text(
            torch.where(drop[:, None, None], tokens, self.text),
            torch.where(drop[:, None], mask, self.mask),
        )

    @staticmethod
    def cat(a: Conditioning, b: Conditioning) -> Conditioning:
        def both(x: Tensor | None, y: Tensor | None) -> Tensor | None:
            return None if x is None or y is None else torch.cat([x, y])

        return Conditioning(
            torch.cat([a.text, b.text]),
            torch.cat([a.mask, b.mask]),
            both(a.lowres, b.lowres),
            both(a.aug_level, b.aug_level),
            both(a.guidance, b.guidance),
            a.null_text,
        )


def model_output(model: Callable[..., Tensor], x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """One U-Net evaluation under ``cond``."""
    if cond.guidance is None:
        return model(x, t, cond.text, cond.mask, cond.lowres, cond.aug_level)
    return model(x, t, cond.text, cond.mask, cond.lowres, cond.aug_level, cond.guidance)


def guided_output(
    model: Callable[..., Tensor],
    x: Tensor,
    t: Tensor,
    cond: Conditioning,
    guidance_scale: float | Tensor,
    uncond: Conditioning | None = None,
) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): out = out(x, u) + s (out(x, c) -
    out(x, u)), with the conditional and unconditional halves in ONE forward pass; u is the
    null caption, or ``uncond`` (a negative prompt, as in DeepFloyd IF and diffusers). Guidance
    is linear in the model output, so it holds for any target (eps, v or x0). s = 1 is the
    conditional prediction and costs a single pass; a tensor ``s`` (B,) sets it per sample.
    Output channels beyond the image's (a learned variance) are not guided: they come from
    the conditional half, as in DeepFloyd IF."""
    if not isinstance(guidance_scale, Tensor) and guidance_scale == 1.0:
        return model_output(model, x, t, cond)
    uncond = uncond if uncond is not None else cond.null()
    both = model_output(model, torch.cat([x, x]), torch.cat([t, t]), Conditioning.cat(cond, uncond))
    cond_out, uncond_out = both.chunk(2)
    if isinstance(guidance_scale, Tensor):
        guidance_scale = guidance_scale.view(-1, *([1] * (x.ndim - 1))).to(cond_out.dtype)
    c = x.shape[1]
    guided = uncond_out[:, :c] + guidance_scale * (cond_out[:, :c] - uncond_out[:, :c])
    return torch.cat([guided, cond_out[:, c:]], 1) if cond_out.shape[1] > c else guided


def make_denoiser(
    model: Callable[..., Tensor],
    schedule: NoiseSchedule,
    cond: Conditioning,
    guidance_scale: float = 1.0,
    threshold: ThresholdConfig | None = None,
    autocast_dtype: torch.dtype | None = None,
    uncond: Conditioning | None = None,
    learned_variance: bool = False,
) -> Denoiser:
    """Wrap a U-Net (or a compiled version of it) and its schedule as a denoiser
    ``(x_t, t) -> Prediction`` (the thresholded x0_hat, and with ``learned_variance`` the
    variance interpolation the network outputs after the image's channels).

    ``autocast_dtype`` (for example torch.bfloat16) runs the U-Net under autocast; the sampler
    state and the conversions stay in float32. Nothing here synchronises with the device.
    """
    return _GuidedDenoiser(
        model,
        schedule,
        cond,
        guidance_scale,
        threshold or ThresholdConfig(),
        autocast_dtype,
        uncond,
        learned_variance,
    )


@dataclass
class _GuidedDenoiser:
    """The denoiser :func:`make_denoiser` returns."""

    model: Callable[..., Tensor]
    schedule: NoiseSchedule
    cond: Conditioning
    guidance_scale: float
    threshold: ThresholdConfig
    autocast_dtype: torch.dtype | None
    uncond: Conditioning | None
    learned_variance: bool

    @torch.no_grad()
    def __call__(self, x: Tensor, t: int) -> Prediction:
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        with autocast(x.device.type, self.autocast_dtype):
            out = guided_output(
                self.model, x, tt.float(), self.cond, self.guidance_scale, self.uncond
            )
        c = x.shape[1]
        x0 = apply_threshold(self.schedule.to_x0(out[:, :c].float(), x, tt), self.threshold)
        return Prediction(x0, out[:, c:].float() if self.learned_variance else None)
