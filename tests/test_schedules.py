import math

import pytest
import torch

from imagen.diffusion.schedules import (
    DiffusionConfig,
    NoiseSchedule,
    cosine_betas,
    linear_betas,
    pred_to_x0,
    respaced_timesteps,
    x0_to_eps,
    x0_to_v,
)


def test_cosine_alpha_bar_matches_formula_and_is_monotone():
    sch = NoiseSchedule(DiffusionConfig(schedule="cosine", timesteps=1000))
    s = 0.008

    def f(t):
        return math.cos((t / 1000 + s) / (1 + s) * math.pi / 2) ** 2

    for t in (0, 10, 500, 900):  # alpha_bar_t = f(t + 1) / f(0) before beta clipping
        assert sch.alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert torch.all(sch.alpha_bar[1:] < sch.alpha_bar[:-1])
    assert sch.alpha_bar[-1] < 1e-6
    assert sch.betas.max() <= 0.999


def test_linear_schedule_endpoints():
    b = linear_betas(1000)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    assert NoiseSchedule(DiffusionConfig(schedule="linear")).alpha_bar[-1] < 1e-3


def test_closed_form_matches_iterated_forward_process():
    """x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps, iterated, has the closed form's mean and
    variance (statistically)."""
    sch = NoiseSchedule(DiffusionConfig(timesteps=200))
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((40000,), 0.7, dtype=torch.float64)
    x = x0.clone()
    for t in range(150):
        beta = sch.betas[t]
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(
            x.shape, generator=g, dtype=torch.float64
        )
    ab = sch.alpha_bar[149]
    assert x.mean().item() == pytest.approx((ab.sqrt() * 0.7).item(), abs=0.015)
    assert x.var().item() == pytest.approx((1 - ab).item(), rel=0.03)
    closed = sch.q_sample(x0.float(), torch.full((40000,), 149), torch.randn(40000, generator=g))
    assert closed.mean().item() == pytest.approx(x.mean().item(), abs=0.02)
    assert closed.var().item() == pytest.approx(x.var().item(), rel=0.04)


def test_posterior_matches_bayes_rule():
    """q(x_{t-1} | x_t, x0) from Bayes: N(x_{t-1}; sqrt(ab_{t-1}) x0, 1 - ab_{t-1}) times
    N(x_t; sqrt(1 - beta_t) x_{t-1}, beta_t), normalised, is Gaussian with this mean and variance."""
    sch = NoiseSchedule()
    t = 300
    ab_prev, beta = sch.alpha_bar[t - 1].item(), sch.betas[t].item()
    x0, xt = torch.tensor([0.4]), torch.tensor([-0.9])
    prec = 1 / (1 - ab_prev) + (1 - beta) / beta
    mean = (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(1 - beta) * xt / beta) / prec
    got_mean, got_var = sch.q_posterior(x0, xt, torch.tensor([t]))
    assert got_mean.item() == pytest.approx(mean.item(), rel=1e-5)
    assert got_var.item() == pytest.approx(1 / prec, rel=1e-5)


@pytest.mark.parametrize("target", ["eps", "v", "x0"])
def test_target_conversions_round_trip(target):
    sch = NoiseSchedule(DiffusionConfig(target=target))
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)
    t = torch.randint(
        0, 900, (8,), generator=g
    )  # x0 from eps divides by alpha: keep it away from 0
    xt = sch.q_sample(x0, t, eps)
    pred = sch.target(x0, eps, t)
    assert torch.allclose(sch.to_x0(pred, xt, t), x0, atol=1e-3)
    alpha, sigma = sch.alpha_sigma(t, 4)
    assert torch.allclose(x0_to_eps(x0, xt, alpha, sigma), eps, atol=1e-3)
    v = x0_to_v(x0, xt, alpha, sigma)
    assert torch.allclose(v, alpha * eps - sigma * x0, atol=1e-3)
    assert torch.allclose(pred_to_x0("v", v, xt, alpha, sigma), x0, atol=1e-4)


def test_min_snr_weights_match_formula():
    t = torch.tensor([0, 100, 500, 900, 999])
    for target in ("eps", "v", "x0"):
        sch = NoiseSchedule(
            DiffusionConfig(target=target, loss_weighting="min_snr", min_snr_gamma=5.0)
        )
        ab = sch.alpha_bar[t]
        snr = (ab / (1 - ab)).float()
        clipped = torch.minimum(snr, torch.tensor(5.0))
        want = {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[target]
        assert torch.allclose(sch.loss_weight(t), want, rtol=1e-5)
    assert torch.equal(NoiseSchedule().loss_weight(t), torch.ones(5))


def test_respaced_timesteps():
    assert respaced_timesteps(1000, 1000) == list(range(999, -1, -1))
    ts = respaced_timesteps(1000, 20)
    assert ts[0] == 999 and len(ts) == 20 and ts == sorted(ts, reverse=True)
    assert len(set(respaced_timesteps(1000, 997))) == 997
    with pytest.raises(ValueError, match="steps"):
        respaced_timesteps(1000, 0)
    with pytest.raises(ValueError, match="cannot sample"):
        respaced_timesteps(10, 11)


def test_bad_config_is_an_error():
    with pytest.raises(ValueError, match="schedule"):
        DiffusionConfig(schedule="quadratic")
    with pytest.raises(ValueError, match="target"):
        DiffusionConfig(target="score")


def test_cosine_betas_clipped():
    assert cosine_betas(10).max().item() == pytest.approx(0.999)
