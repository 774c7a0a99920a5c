"""Noise schedules, the forward process and the conversions between prediction targets.

Notation follows Ho et al. (2020) and the Imagen paper (Saharia et al. 2022):
``alpha_bar[t]`` is the cumulative product of ``1 - beta``; a noisy sample is
``x_t = alpha_t * x0 + sigma_t * eps`` with ``alpha_t = sqrt(alpha_bar[t])`` and
``sigma_t = sqrt(1 - alpha_bar[t])``. Timesteps are integers ``0 .. T-1``; ``t = 0`` is the
least noisy step (it still carries a little noise), "clean" is ``alpha_bar = 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from imagen.diffusion.timestep_lists import IF_TIMESTEPS

ScheduleKind = Literal["cosine", "linear", "scaled_linear"]
Target = Literal["eps", "v", "x0"]
LossWeighting = Literal["mse", "min_snr"]


@dataclass
class DiffusionConfig:
    """How one stage is diffused: schedule, prediction target and loss weighting."""

    # cosine (Nichol & Dhariwal 2021), linear (Ho et al.) or scaled_linear (linear in sqrt(beta):
    # latent diffusion's "linear", the Stable Diffusion x4 upscaler's)
    schedule: ScheduleKind = "cosine"
    timesteps: int = 1000  # T, the number of discrete training timesteps
    target: Target = "eps"  # what the network predicts: noise, velocity or the clean image
    loss_weighting: LossWeighting = "mse"  # plain MSE on the target, or min-SNR-gamma
    min_snr_gamma: float = 5.0  # gamma of min-SNR weighting (Hang et al. 2023)
    linear_beta_start: float = 1e-4  # linear and scaled_linear schedules only
    linear_beta_end: float = 0.02  # linear and scaled_linear schedules only
    cosine_s: float = 0.008  # cosine schedule offset s
    # alpha_bar as diffusers computes it (betas from Python floats, cumulative product in
    # float32): imported DeepFloyd IF stages, so that their images match diffusers' exactly
    float32_alphas: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "linear", "scaled_linear"):
            raise ValueError(
                f"schedule must be cosine, linear or scaled_linear, got {self.schedule!r}"
            )
        if self.target not in ("eps", "v", "x0"):
            raise ValueError(f"target must be 'eps', 'v' or 'x0', got {self.target!r}")
        if self.loss_weighting not in ("mse", "min_snr"):
            raise ValueError(
                f"loss_weighting must be 'mse' or 'min_snr', got {self.loss_weighting!r}"
            )
        if self.timesteps < 2:
            raise ValueError(f"timesteps must be >= 2, got {self.timesteps}")


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17):
    alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2); beta_t = 1 - alpha_bar_t /
    alpha_bar_{t-1}, clipped at ``max_beta``."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64, device="cpu") / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(0, max_beta)


def cosine_betas_diffusers(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """The cosine betas exactly as diffusers' ``betas_for_alpha_bar`` computes them (each beta
    from Python floats, as float32): the schedule DeepFloyd IF was trained and sampled with."""

    def f(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / timesteps) / f(i / timesteps), max_beta) for i in range(timesteps)]
    return torch.tensor(betas, dtype=torch.float32, device="cpu")


def linear_betas(timesteps: int, start: float = 1e-4, end: float = 0.02) -> Tensor:
    """Linear schedule of Ho et al. (2020), scaled so that T != 1000 keeps its shape."""
    scale = 1000 / timesteps
    return torch.linspace(start * scale, end * scale, timesteps, dtype=torch.float64, device="cpu")


def scaled_linear_betas(timesteps: int, start: float = 1e-4, end: float = 0.02) -> Tensor:
    """Betas linear in sqrt(beta) from ``start`` to ``end`` (latent diffusion's "linear"
    schedule, diffusers' "scaled_linear": the Stable Diffusion x4 upscaler's)."""
    root = torch.linspace(start**0.5, end**0.5, timesteps, dtype=torch.float64, device="cpu")
    return root**2


def schedule_betas(c: DiffusionConfig) -> Tensor:
    """The betas of a config, float64; with ``float32_alphas`` as diffusers computes them in
    float32 (returned as float64 holding the float32 values)."""
    if c.schedule == "cosine":
        if c.float32_alphas:
            return cosine_betas_diffusers(c.timesteps, c.cosine_s).double()
        return cosine_betas(c.timesteps, c.cosine_s)
    if c.schedule == "scaled_linear":
        if c.float32_alphas:
            root = torch.linspace(
                c.linear_beta_start**0.5,
                c.linear_beta_end**0.5,
                c.timesteps,
                dtype=torch.float32,
                device="cpu",
            )
            return (root**2).double()
        return scaled_linear_betas(c.timesteps, c.linear_beta_start, c.linear_beta_end)
    betas = linear_betas(c.timesteps, c.linear_beta_start, c.linear_beta_end)
    return betas.float().double() if c.float32_alphas else betas


class NoiseSchedule:
    """A discrete variance-preserving schedule with its closed forms (kept in float64, on the
    CPU whatever the default device: the samplers read it as Python floats, and the training
    loss gathers from it per batch)."""

    def __init__(self, config: DiffusionConfig | None = None) -> None:
        self.config = config or DiffusionConfig()
        c = self.config
        betas = schedule_betas(c)
        if c.float32_alphas:  # diffusers: the cumulative product in float32, kept as float64
            alpha_bar = torch.cumprod(1 - betas.float(), dim=0).double()
        else:
            alpha_bar = torch.cumprod(1 - betas, dim=0)
        self.betas = betas
        self.alpha_bar = alpha_bar
        self.alpha_bar_prev = torch.cat(
            [torch.ones(1, dtype=torch.float64, device="cpu"), self.alpha_bar[:-1]]
        )
        self._copies: dict[tuple[str, torch.device], Tensor] = {}

    def _gather(self, name: str, t: Tensor, ndim: int = 1) -> Tensor:
        """The table ``name`` (betas, alpha_bar, alpha_bar_prev) at timesteps ``t``, reshaped to
        broadcast against a tensor with ``ndim`` dimensions. Tables are copied to a device
        once: a per-step host-to-device copy would make every training step wait."""
        values = getattr(self, name)
        if t.device.type != "cpu":
            key = (name, t.device)
            if key not in self._copies:
                self._copies[key] = values.to(t.device)
            values = self._copies[key]
        return values[t].reshape(-1, *([1] * (ndim - 1)))

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    # alpha_t and sigma_t of x_t = alpha_t x0 + sigma_t eps, as float32 tensors broadcastable to x
    def alpha_sigma(self, t: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
        ab = self._gather("alpha_bar", t, ndim)
        return ab.sqrt().float(), (1 - ab).sqrt().float()

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Closed-form forward process q(x_t | x_0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I)
        (Ho et al. 2020, eq. 4)."""
        alpha, sigma = self.alpha_sigma(t, x0.ndim)
        return alpha * x0 + sigma * noise

    def q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 6-7)."""
        nd = x0.ndim
        beta = self._gather("betas", t, nd)
        ab = self._gather("alpha_bar", t, nd)
        ab_prev = self._gather("alpha_bar_prev", t, nd)
        coef_x0 = beta * ab_prev.sqrt() / (1 - ab)
        coef_xt = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
        var = beta * (1 - ab_prev) / (1 - ab)
        return coef_x0.float() * x0 + coef_xt.float() * xt, var.float()

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar), float32."""
        ab = self._gather("alpha_bar", t)
        return (ab / (1 - ab)).float()

    def loss_weight(self, t: Tensor) -> Tensor:
        """Per-sample weight of the MSE on the configured target.

        Min-SNR-gamma (Hang et al. 2023, sec. 3.4) weights the x0-space loss by min(SNR, gamma);
        expressed on each target's own MSE this is min(SNR, gamma) / SNR for eps,
        min(SNR, gamma) / (SNR + 1) for v, and min(SNR, gamma) for x0.
        """
        c = self.config
        if c.loss_weighting == "mse":
            return torch.ones(t.shape, device=t.device)
        snr = self.snr(t)
        clipped = snr.clamp(max=c.min_snr_gamma)
        if c.target == "eps":
            return clipped / snr
        if c.target == "v":
            return clipped / (snr + 1)
        return clipped

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The training target for the configured parameterisation."""
        kind = self.config.target
        if kind == "eps":
            return noise
        if kind == "x0":
            return x0
        alpha, sigma = self.alpha_sigma(t, x0.ndim)
        return alpha * noise - sigma * x0  # v (Salimans & Ho 2022, eq. 11 area)

    def to_x0(self, prediction: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """Convert the network output (whatever the target) to an estimate of x0."""
        alpha, sigma = self.alpha_sigma(t, xt.ndim)
        return pred_to_x0(self.config.target, prediction, xt, alpha, sigma)


def pred_to_x0(target: Target, pred: Tensor, xt: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x0 from a prediction: eps -> (x_t - sigma eps) / alpha; v -> alpha x_t - sigma v."""
    if target == "eps":
        return (xt - sigma * pred) / alpha
    if target == "v":
        return alpha * xt - sigma * pred
    return pred


def x0_to_eps(x0: Tensor, xt: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps implied by x0 and x_t: (x_t - alpha x0) / sigma."""
    return (xt - alpha * x0) / sigma


def x0_to_v(x0: Tensor, xt: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """v implied by x0 and x_t (alpha^2 + sigma^2 = 1): v = alpha eps - sigma x0."""
    return alpha * x0_to_eps(x0, xt, alpha, sigma) - sigma * x0


SPACINGS = ("trailing", "leading")
"""How :func:`respaced_timesteps` spreads a number of steps; a name in ``IF_TIMESTEPS``
(diffusion/timestep_lists.py) is a fixed list instead."""


def check_spacing(spacing: str, steps: int, num_timesteps: int | None = None) -> None:
    """Raise ValueError unless ``spacing`` is known and, for a named list, ``steps`` is its
    length; with ``num_timesteps`` (a schedule's), also unless the steps fit that schedule
    (IF's lists start at timestep 999: a schedule of fewer than 1000 timesteps has none)."""
    if num_timesteps is not None and steps > num_timesteps:
        raise ValueError(f"cannot sample with {steps} steps from a {num_timesteps}-step schedule")
    if spacing in SPACINGS:
        return
    if spacing not in IF_TIMESTEPS:
        names = ", ".join((*SPACINGS, *IF_TIMESTEPS))
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {names}")
    if steps != len(IF_TIMESTEPS[spacing]):
        raise ValueError(
            f"the timestep list {spacing!r} has {len(IF_TIMESTEPS[spacing])} steps, not {steps}"
        )
    if num_timesteps is not None and max(IF_TIMESTEPS[spacing]) >= num_timesteps:
        raise ValueError(
            f"the timestep list {spacing!r} is for a schedule of {max(IF_TIMESTEPS[spacing]) + 1}"
            f" timesteps; this stage's has {num_timesteps} (use trailing or leading spacing)"
        )


def clipped_start(alpha_bar: Tensor, lambda_min: float | None) -> int:
    """The noisiest timestep whose half log-SNR lambda = log(alpha / sigma) is >= ``lambda_min``
    (DPM-Solver's lambda clipping: diffusers' ``lambda_min_clipped``, -5.1 for IF's cosine
    schedule), or the last timestep when ``lambda_min`` is None."""
    last = alpha_bar.shape[0] - 1
    if lambda_min is None:
        return last
    lam = 0.5 * (alpha_bar.log() - (1 - alpha_bar).log())
    ok = (lam >= lambda_min).nonzero()
    return int(ok.max()) if ok.numel() else 0


def respaced_timesteps(
    num_timesteps: int,
    steps: int,
    spacing: str = "trailing",
    start: int | None = None,
    offset: int = 0,
) -> list[int]:
    """``steps`` descending training timesteps for sampling with any number of steps, after
    which the samplers step to the clean image. ``start`` (default T-1) is the noisiest one.

    "trailing" spacing gives start, start-S/n, ..., S/n-1 (S = start + 1); ``steps = T`` gives
    every timestep. Ending at S/n-1 rather than at 0 matters for multistep solvers: a last
    jump from ~T/n to 0 spans a large range of log-SNR in the cosine schedule (the "lambda
    clipping" problem of DPM-Solver), measured in tests/test_samplers.py. "leading" spacing
    is diffusers' DDPM default (DeepFloyd IF's): (n-1)k, ..., k, 0 with k = T // n, each
    plus ``offset`` (diffusers' ``steps_offset``: 1 for the Stable Diffusion x4 upscaler's
    DDIM). A name in ``IF_TIMESTEPS`` returns that list (``steps`` must be its length).
    """
    if steps < 1:
        raise ValueError(f"number of sampling steps must be >= 1, got {steps}")
    check_spacing(spacing, steps, num_timesteps)
    if spacing in IF_TIMESTEPS:
        return list(IF_TIMESTEPS[spacing])
    span = num_timesteps if start is None else start + 1
    if spacing == "leading":  # ``start`` does not apply: its first step is T - k
        k = num_timesteps // steps
        return [min(k * i + offset, num_timesteps - 1) for i in reversed(range(steps))]
    return [max(0, round(span - i * span / steps) - 1) for i in range(steps)]
