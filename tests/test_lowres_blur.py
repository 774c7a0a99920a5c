"""Blur augmentation of a super-resolution stage's low-res conditioning (training only)."""

from __future__ import annotations

import pytest
import torch

from imagen.models.lowres import blur_lowres
from imagen.models.presets import get_preset
from imagen.models.stage import Stage, TrainingDraws
from imagen.text.encoders import TextEmbedding
from imagen.training.config import TrainConfig
from imagen.training.data import DrawSpec, draw_batch


def test_blur_is_a_normalised_gaussian_per_sample():
    x = torch.zeros(3, 2, 17, 17)
    x[:, :, 8, 8] = 1.0
    y = blur_lowres(x, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(y[0], x[0])  # sigma 0 leaves the sample as it is
    torch.testing.assert_close(y.sum((2, 3)), torch.ones(3, 2))  # mass kept
    assert y[1, 0, 8, 8] > y[2, 0, 8, 8] > 0.15  # a wider kernel, a lower peak
    centre = torch.exp(-0.5 * torch.arange(-4.0, 5.0) ** 2)
    centre = centre / centre.sum()
    torch.testing.assert_close(y[2, 0, 8, 4:13], centre * centre[4])  # separable, sigma 1
    flat = torch.full((1, 3, 6, 6), 0.3)
    torch.testing.assert_close(blur_lowres(flat, torch.tensor([1.5])), flat)  # edges replicated


def test_blur_draws_only_for_super_resolution_stages():
    cfg = TrainConfig(blur_max=0.8)
    base = DrawSpec.of(get_preset("tiny-base"), cfg, 1000)
    sr = DrawSpec.of(get_preset("tiny-sr"), cfg, 1000)
    assert base.blur_max == 0.0 and draw_batch(base, 0, 4, torch.device("cpu")).blur is None
    blur = draw_batch(sr, 0, 64, torch.device("cpu")).blur
    assert blur is not None and blur.min() >= 0 and blur.max() < 0.8 and blur.std() > 0.1
    plain = DrawSpec.of(get_preset("tiny-sr"), TrainConfig(), 1000)
    assert draw_batch(plain, 0, 4, torch.device("cpu")).blur is None


@pytest.mark.parametrize("value", [-0.1, 1.6])
def test_blur_max_out_of_range_is_refused(value):
    with pytest.raises(ValueError, match="blur_max"):
        TrainConfig(blur_max=value)


def test_the_loss_sees_the_blurred_lowres():
    torch.manual_seed(0)
    stage = Stage(get_preset("tiny-sr")).eval()
    with torch.no_grad():  # the output layers start at zero: give them weights
        for p in stage.unet.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    text = TextEmbedding(torch.randn(2, 4, 32), torch.ones(2, 4, dtype=torch.bool))
    spec = DrawSpec.of(stage.config, TrainConfig(blur_max=1.0), 1000)
    draws = draw_batch(spec, 0, 2, torch.device("cpu"))
    unblurred = TrainingDraws(*draws._fields()[:-1])
    zero = TrainingDraws(*draws._fields()[:-1], blur=torch.zeros(2))
    with torch.no_grad():
        assert stage.loss(images, text, zero) == stage.loss(images, text, unblurred)
        assert stage.loss(images, text, draws) != stage.loss(images, text, unblurred)
