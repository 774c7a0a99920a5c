"""Samplers: plain functions over a denoiser ``(x_t, t) -> Prediction`` (x0_hat, and the
learned variance where a network has one; diffusion/denoiser.py), as in k-diffusion.

Every sampler takes the same arguments, so it works with any model (through
:func:`imagen.diffusion.guidance.make_denoiser`) and any number of steps: ``timesteps`` is a descending
list of training timesteps (see :func:`imagen.diffusion.schedules.respaced_timesteps`) and
``alpha_bar`` the schedule's cumulative products. After the last listed timestep the
samplers step to the clean image (alpha_bar = 1). Guidance and thresholding live in the
denoiser, so they apply in every sampler.

:data:`SAMPLERS` registers each sampler with its own options (DDIM's ``eta``, DDPM's
``variance``); everything that offers a choice of sampler takes the list from there.
:class:`Progress` and :data:`ProgressCallback` are the one progress-and-cancel interface of
sampling, from a stage's steps up to the server.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from imagen.diffusion.denoiser import Denoiser, Prediction
from imagen.diffusion.sampler_names import SAMPLER_HELP, SAMPLER_NAMES

Callback = Callable[[int, Tensor], None]
"""A sampler's per-step callback: ``callback(i, x)`` after step i (0-based) with the new x."""
Generators = torch.Generator | list[torch.Generator] | None


@dataclass(frozen=True)
class Progress:
    """Where sampling stands, reported after every denoiser step (the one progress record from
    the stages through the cascade and the pipeline to the server)."""

    stage: int  # which of the stages that run is running (0 = the first that runs)
    stages: int  # how many stages run (all of the cascade's, or its SR stages when upscaling)
    step: int  # denoiser steps done in this stage for this batch (1 ... steps)
    steps: int  # denoiser steps this stage runs
    batch_start: int = 0  # index of the batch's first image among all images of the call
    batch_size: int = 1  # images in this batch
    images_total: int = 1  # images in the whole call

    @property
    def fraction(self) -> float:
        """Fraction of the whole call's work done, in [0, 1] (stages weigh the same)."""
        in_batch = (self.stage + self.step / max(1, self.steps)) / max(1, self.stages)
        return (self.batch_start + self.batch_size * in_batch) / max(1, self.images_total)


ProgressCallback = Callable[[Progress], bool | None]
"""Called with a :class:`Progress` after every denoiser step; returning False cancels: sampling
stops and :class:`Cancelled` is raised (no partial results)."""


class Cancelled(Exception):
    """A progress callback returned False: sampling was stopped."""


def step_callback(progress: ProgressCallback | None, at: Progress) -> Callback | None:
    """The one adapter from a sampler's ``callback(i, x)`` to a :data:`ProgressCallback`:
    reports ``at`` with ``step = i + 1`` and raises :class:`Cancelled` when it returns False."""
    if progress is None:
        return None

    def callback(i: int, _x: Tensor) -> None:
        if progress(replace(at, step=i + 1)) is False:
            raise Cancelled(f"cancelled at stage {at.stage}, step {i + 1} of {at.steps}")

    return callback


def randn(
    shape: tuple[int, ...],
    generator: Generators,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise of ``shape``; with a list of generators, sample i draws from
    generator i (on that generator's device), so an image does not depend on its batch."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack(
            [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generator]
        ).to(device)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def randn_like(x: Tensor, generator: Generators) -> Tensor:
    return randn(tuple(x.shape), generator, x.device, x.dtype)


def _alpha_bars(alpha_bar: Tensor, timesteps: list[int]) -> list[tuple[float, float]]:
    """(alpha_bar_t, alpha_bar_next) pairs for each step; the last step goes to clean (1.0)."""
    vals = [float(alpha_bar[t]) for t in timesteps] + [1.0]
    return list(zip(vals[:-1], vals[1:], strict=True))


DDPM_VARIANCES = ("posterior", "beta", "learned_range")


def learned_variance(p: Prediction) -> Tensor:
    """The variance interpolation v of a prediction, or a clear error when its network
    predicts none."""
    if p.variance is None:
        raise ValueError(
            "the learned_range DDPM variance needs a stage that predicts its variance (an "
            "imported DeepFloyd IF stage); choose posterior or beta"
        )
    return p.variance


def ddim_step(
    x: Tensor, x0: Tensor, alpha_t: Any, sigma_t: Any, alpha_s: Any, noise_s: Any
) -> Tensor:
    """The deterministic part of a DDIM step from t to s (Song et al. 2021, eq. 12):
    alpha_s x0 + noise_s eps, with eps = (x - alpha_t x0) / sigma_t the noise x0 implies and
    ``noise_s`` its weight at s (sigma_s for eta = 0). Floats, or tensors per sample."""
    return alpha_s * x0 + noise_s * (x - alpha_t * x0) / sigma_t


def sample_ddpm(
    denoise: Denoiser,
    x: Tensor,
    timesteps: list[int],
    alpha_bar: Tensor,
    generator: Generators = None,
    variance: str = "posterior",
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020): x_s ~ N(mu(x_t, x0_hat), sigma^2 I) with the
    respaced beta = 1 - alpha_bar_t / alpha_bar_s and sigma^2 the posterior variance
    beta (1 - alpha_bar_s) / (1 - alpha_bar_t) (``variance="posterior"``), beta
    (``variance="beta"``), or the network's learned interpolation between their logs
    (``variance="learned_range"``, Nichol & Dhariwal 2021 eq. 15, as diffusers computes it:
    log sigma^2 = f log beta + (1 - f) log max(posterior, 1e-20), f = (v + 1) / 2)."""
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"variance must be one of {', '.join(DDPM_VARIANCES)}, got {variance!r}")
    pairs = _alpha_bars(alpha_bar, timesteps)
    for i, (t, (ab_t, ab_s)) in enumerate(zip(timesteps, pairs, strict=True)):
        p = denoise(x, t)
        x0 = p.x0
        beta = 1 - ab_t / ab_s
        # posterior mean of q(x_s | x_t, x0) (Ho et al. 2020, eq. 7, with respaced betas)
        coef_x0 = math.sqrt(ab_s) * beta / (1 - ab_t)
        coef_xt = math.sqrt(1 - beta) * (1 - ab_s) / (1 - ab_t)
        x = coef_x0 * x0 + coef_xt * x
        if i < len(timesteps) - 1:
            posterior = beta * (1 - ab_s) / (1 - ab_t)
            noise = randn_like(x, generator)
            if variance == "learned_range":
                f = (learned_variance(p) + 1) / 2
                log_var = f * math.log(beta) + (1 - f) * math.log(max(posterior, 1e-20))
                x = x + torch.exp(0.5 * log_var) * noise
            else:
                x = x + math.sqrt(posterior if variance == "posterior" else beta) * noise
        if callback is not None:
            callback(i, x)
    return x


def sample_ddim(
    denoise: Denoiser,
    x: Tensor,
    timesteps: list[int],
    alpha_bar: Tensor,
    generator: Generators = None,
    eta: float = 0.0,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps +
    sigma z, sigma = eta sqrt((1 - ab_s)/(1 - ab_t)) sqrt(1 - ab_t/ab_s). eta = 0 is the
    deterministic probability-flow sampler; eta = 1 matches ancestral sampling."""
    pairs = _alpha_bars(alpha_bar, timesteps)
    for i, (t, (ab_t, ab_s)) in enumerate(zip(timesteps, pairs, strict=True)):
        x0 = denoise(x, t).x0
        sigma = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
        noise_s = math.sqrt(max(1 - ab_s - sigma**2, 0.0))
        x = ddim_step(x, x0, math.sqrt(ab_t), math.sqrt(1 - ab_t), math.sqrt(ab_s), noise_s)
        if sigma > 0:
            x = x + sigma * randn_like(x, generator)
        if callback is not None:
            callback(i, x)
    return x


def sample_dpmpp_2m(
    denoise: Denoiser,
    x: Tensor,
    timesteps: list[int],
    alpha_bar: Tensor,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), data-prediction multistep solver of the
    probability-flow ODE in lambda = log(alpha / sigma):
    x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D, h = lambda_s - lambda_t, with
    D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev, r = h_prev / h (first order on the first and the
    last step). ``generator`` is unused (the solver is deterministic)."""
    del generator
    pairs = _alpha_bars(alpha_bar, timesteps)
    x0_prev: Tensor | None = None
    h_prev = 0.0
    for i, (t, (ab_t, ab_s)) in enumerate(zip(timesteps, pairs, strict=True)):
        x0 = denoise(x, t).x0
        if ab_s >= 1.0:  # the last step lands on the clean image: x_0 = D = x0_hat
            x = x0
        else:
            alpha_t, sigma_t = math.sqrt(ab_t), math.sqrt(1 - ab_t)
            alpha_s, sigma_s = math.sqrt(ab_s), math.sqrt(1 - ab_s)
            h = math.log(alpha_s / sigma_s) - math.log(alpha_t / sigma_t)
            if x0_prev is None:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (sigma_s / sigma_t) * x - alpha_s * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, x)
    return x


@dataclass(frozen=True)
class SamplerOption:
    """A keyword argument one sampler takes beyond the common ones, with its default and the
    :class:`~imagen.models.stage.SamplingConfig` field that holds it."""

    name: str  # the sampler function's keyword argument
    config_field: str  # the SamplingConfig field it is read from
    default: float | str
    help: str
    choices: tuple[str, ...] = ()  # for text options: the allowed values
    minimum: float | None = None  # for numeric options: the smallest allowed value

    def check(self, value: Any) -> None:
        """Raise ValueError unless ``value`` is allowed for this option."""
        where = f"{self.config_field} ({self.help})"
        if self.choices:
            if value not in self.choices:
                raise ValueError(f"{where} must be one of {', '.join(self.choices)}, got {value!r}")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value) or (self.minimum is not None and value < self.minimum):
            raise ValueError(f"{where} must be a finite number >= {self.minimum}, got {value}")


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: its function, a one-line description and its own options."""

    name: str
    fn: Callable[..., Tensor]
    help: str
    options: tuple[SamplerOption, ...] = ()

    def __call__(
        self,
        denoise: Denoiser,
        x: Tensor,
        timesteps: list[int],
        alpha_bar: Tensor,
        generator: Generators = None,
        callback: Callback | None = None,
        **options: Any,
    ) -> Tensor:
        """Run the sampler; ``options`` are this sampler's own keyword arguments."""
        known = {o.name for o in self.options}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"sampler {self.name!r} has no option(s) {', '.join(unknown)}; "
                f"it takes {', '.join(sorted(known)) or 'none'}"
            )
        return self.fn(
            denoise, x, timesteps, alpha_bar, generator=generator, callback=callback, **options
        )


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler(
            "ddpm",
            sample_ddpm,
            SAMPLER_HELP["ddpm"],
            (
                SamplerOption(
                    "variance",
                    "ddpm_variance",
                    "posterior",
                    "DDPM step variance",
                    choices=DDPM_VARIANCES,
                ),
            ),
        ),
        Sampler(
            "ddim",
            sample_ddim,
            SAMPLER_HELP["ddim"],
            (
                SamplerOption(
                    "eta", "eta", 0.0, "DDIM noise: 0 deterministic, 1 ancestral", minimum=0.0
                ),
            ),
        ),
        Sampler("dpmpp", sample_dpmpp_2m, SAMPLER_HELP["dpmpp"]),
    )
}
"""Every sampler by short name: the one list the configs, the command line, the server and
the evaluation take their choices from (the command line takes the same names and descriptions
from the torch-free :mod:`imagen.diffusion.sampler_names`)."""
if tuple(SAMPLERS) != SAMPLER_NAMES:  # one list of names: a sampler must be added to both
    raise ImportError(
        f"SAMPLERS {tuple(SAMPLERS)} and sampler_names.SAMPLER_NAMES {SAMPLER_NAMES} differ"
    )


def sampler_names() -> tuple[str, ...]:
    """The registered samplers' short names."""
    return tuple(SAMPLERS)


def get_sampler(name: str) -> Sampler:
    """Look a sampler up by its short name (see :data:`SAMPLERS`)."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None
