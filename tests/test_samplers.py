"""Samplers against a case with a known answer: Gaussian data N(mu, s^2) per dimension, whose
exact denoiser is E[x0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu), and
whose probability-flow ODE maps x_T to mu + s (x_T - alpha_T mu) / sqrt(alpha_T^2 s^2 + sigma_T^2)."""

import math

import pytest
import torch

from imagen.diffusion.denoiser import Prediction
from imagen.diffusion.samplers import get_sampler, sample_ddim, sample_ddpm, sample_dpmpp_2m
from imagen.diffusion.schedules import DiffusionConfig, NoiseSchedule, respaced_timesteps

MU, S = 0.3, 0.5


@pytest.fixture(scope="module", params=["cosine", "linear"])
def schedule(request):
    return NoiseSchedule(DiffusionConfig(schedule=request.param))


def exact_denoiser(schedule):
    def denoise(x, t):
        ab = float(schedule.alpha_bar[t])
        a = math.sqrt(ab)
        return Prediction(MU + (a * S * S / (a * a * S * S + 1 - ab)) * (x - a * MU))

    return denoise


def exact_flow(schedule, x, t):
    ab = float(schedule.alpha_bar[t])
    a = math.sqrt(ab)
    return MU + S * (x - a * MU) / math.sqrt(a * a * S * S + 1 - ab)


def ode_error(sampler, schedule, steps):
    x = torch.randn(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = respaced_timesteps(schedule.num_timesteps, steps)
    out = sampler(exact_denoiser(schedule), x.clone(), ts, schedule.alpha_bar)
    return (out - exact_flow(schedule, x, ts[0])).abs().mean().item(), out


def test_dpmpp_20_steps_is_close_to_exact_and_to_1000_steps(schedule):
    err20, out20 = ode_error(sample_dpmpp_2m, schedule, 20)
    err1000, out1000 = ode_error(sample_dpmpp_2m, schedule, 1000)
    assert err20 < 0.02 and err1000 < 0.001
    assert (out20 - out1000).abs().mean() < 0.02


def test_ddim_25_steps_is_close_and_converges_at_first_order(schedule):
    err25, out25 = ode_error(sample_ddim, schedule, 25)
    err50, _ = ode_error(sample_ddim, schedule, 50)
    err1000, out1000 = ode_error(sample_ddim, schedule, 1000)
    assert err25 < 0.08 and err1000 < 0.003  # (the data std is 0.5; values span about +-2)
    assert (out25 - out1000).abs().mean() < 0.08
    assert 0.35 < err50 / err25 < 0.65  # halving the step halves the error: first order


def test_dpmpp_converges_faster_than_ddim(schedule):
    for steps in (10, 20):
        assert (
            ode_error(sample_dpmpp_2m, schedule, steps)[0]
            < ode_error(sample_ddim, schedule, steps)[0]
        )


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_ancestral_sampler_has_the_data_distribution(variance):
    schedule = NoiseSchedule()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, generator=g, dtype=torch.float64)
    ts = respaced_timesteps(1000, 1000)
    y = sample_ddpm(
        exact_denoiser(schedule), x, ts, schedule.alpha_bar, generator=g, variance=variance
    )
    assert y.mean().item() == pytest.approx(MU, abs=0.015)
    assert y.std().item() == pytest.approx(S, rel=0.03)


def test_ddim_eta_one_is_stochastic_and_eta_zero_is_not():
    schedule = NoiseSchedule()
    ts = respaced_timesteps(1000, 10)
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    d = exact_denoiser(schedule)
    a = sample_ddim(d, x.clone(), ts, schedule.alpha_bar, torch.Generator().manual_seed(1), eta=0.0)
    b = sample_ddim(d, x.clone(), ts, schedule.alpha_bar, torch.Generator().manual_seed(2), eta=0.0)
    c = sample_ddim(d, x.clone(), ts, schedule.alpha_bar, torch.Generator().manual_seed(1), eta=1.0)
    e = sample_ddim(d, x.clone(), ts, schedule.alpha_bar, torch.Generator().manual_seed(2), eta=1.0)
    assert torch.equal(a, b) and not torch.allclose(c, e)


def test_every_sampler_takes_any_step_count_and_lands_on_x0_hat():
    schedule = NoiseSchedule()
    for name in ("ddpm", "ddim", "dpmpp"):
        for steps in (1, 3, 7):
            seen: list[int] = []

            def denoise(x, t, seen=seen):
                seen.append(t)
                return Prediction(torch.zeros_like(x))

            out = get_sampler(name)(
                denoise,
                torch.randn(4),
                respaced_timesteps(1000, steps),
                schedule.alpha_bar,
                generator=torch.Generator().manual_seed(0),
            )
            assert len(seen) == steps and torch.equal(out, torch.zeros(4))
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("euler")
