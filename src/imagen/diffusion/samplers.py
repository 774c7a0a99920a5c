"""Samplers: plain functions over a denoiser ``(x_t, t) -> x0_hat``, as in k-diffusion.

Every sampler takes the same arguments, so it works with any model (through
:func:`imagen.diffusion.guidance.make_denoiser`) and any number of steps: ``timesteps`` is a descending
list of training timesteps (see :func:`imagen.diffusion.schedules.respaced_timesteps`) and
``alpha_bar`` the schedule's cumulative products. After the last listed timestep the
samplers step to the clean image (alpha_bar = 1). Guidance and thresholding live in the
denoiser, so they apply in every sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from imagen.diffusion.guidance import Denoiser

Callback = Callable[[int, Tensor], None]
Generators = torch.Generator | list[torch.Generator] | None


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
    beta (1 - alpha_bar_s) / (1 - alpha_bar_t) (``variance="posterior"``) or beta
    (``variance="beta"``)."""
    if variance not in ("posterior", "beta"):
        raise ValueError(f"variance must be 'posterior' or 'beta', got {variance!r}")
    pairs = _alpha_bars(alpha_bar, timesteps)
    for i, (t, (ab_t, ab_s)) in enumerate(zip(timesteps, pairs, strict=True)):
        x0 = denoise(x, t)
        beta = 1 - ab_t / ab_s
        # posterior mean of q(x_s | x_t, x0) (Ho et al. 2020, eq. 7, with respaced betas)
        coef_x0 = math.sqrt(ab_s) * beta / (1 - ab_t)
        coef_xt = math.sqrt(1 - beta) * (1 - ab_s) / (1 - ab_t)
        x = coef_x0 * x0 + coef_xt * x
        if i < len(timesteps) - 1:
            var = beta * (1 - ab_s) / (1 - ab_t) if variance == "posterior" else beta
            noise = randn_like(x, generator)
            x = x + math.sqrt(var) * noise
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
        x0 = denoise(x, t)
        eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
        sigma = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
        x = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - sigma**2, 0.0)) * eps
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
        x0 = denoise(x, t)
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


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp": sample_dpmpp_2m,
}


def get_sampler(name: str) -> Callable[..., Tensor]:
    """Look a sampler up by its short name (ddpm, ddim, dpmpp)."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None
