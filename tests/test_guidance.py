import pytest
import torch

from imagen.diffusion.guidance import (
    Conditioning,
    ThresholdConfig,
    apply_threshold,
    dynamic_threshold,
    guided_output,
    model_output,
)
from imagen.models.presets import tiny_base
from imagen.models.unet import UNet


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = UNet(tiny_base(16, 32).unet).eval()
    for p in model.parameters():  # zero-initialised output layers would make every output 0
        p.data.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([10.0, 500.0, 900.0])
    text = torch.randn(3, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    return model, x, t, Conditioning(text, mask)


def test_guidance_scale_one_is_the_conditional_prediction(setup):
    model, x, t, cond = setup
    with torch.no_grad():
        assert torch.allclose(
            guided_output(model, x, t, cond, 1.0), model_output(model, x, t, cond)
        )


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_batched_guidance_equals_two_passes(setup, scale):
    model, x, t, cond = setup
    with torch.no_grad():
        c = model_output(model, x, t, cond)
        u = model_output(model, x, t, cond.null())
        want = u + scale * (c - u)
        got = guided_output(model, x, t, cond, scale)
    assert not torch.allclose(c, u)  # the text matters, so the check below is not vacuous
    assert torch.allclose(got, want, atol=1e-5)


def test_guidance_is_one_forward_pass(setup):
    model, x, t, cond = setup
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        guided_output(model, x, t, cond, 5.0)
    handle.remove()
    assert calls == [6]  # one pass over the doubled batch


def test_null_condition_is_zero_text_empty_mask(setup):
    _, _, _, cond = setup
    null = cond.null()
    assert not null.mask.any() and torch.count_nonzero(null.text) == 0


def test_dynamic_threshold_leaves_in_range_samples_untouched():
    x = torch.rand(4, 3, 8, 8) * 1.8 - 0.9
    assert torch.equal(dynamic_threshold(x), x)


def test_dynamic_threshold_maps_out_of_range_per_sample():
    g = torch.Generator().manual_seed(0)
    inside = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    outside = torch.randn(1, 3, 8, 8, generator=g) * 3
    x = torch.cat([inside, outside])
    y = dynamic_threshold(x, 0.995)
    assert torch.equal(y[0], x[0])  # the in-range sample is not affected by its neighbour
    assert y.abs().max() <= 1.0
    s = torch.quantile(outside.abs().flatten(), 0.995)
    assert torch.allclose(y[1], outside[0].clamp(-s, s) / s)
    capped = dynamic_threshold(x, 0.995, max_scale=1.5)
    assert torch.allclose(capped[1], outside[0].clamp(-1.5, 1.5) / 1.5)


def test_static_and_no_threshold():
    x = torch.tensor([[-3.0, 0.5, 2.0]])
    assert torch.equal(
        apply_threshold(x, ThresholdConfig("static")), torch.tensor([[-1.0, 0.5, 1.0]])
    )
    assert torch.equal(apply_threshold(x, ThresholdConfig("none")), x)
    with pytest.raises(ValueError, match="percentile"):
        ThresholdConfig(percentile=1.5)
