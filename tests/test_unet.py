import pytest
import torch

from imagen.models.presets import tiny_base, tiny_sr
from imagen.models.unet import UNet, UNetConfig


def perturbed(config):
    torch.manual_seed(0)
    model = UNet(config).eval()
    for p in model.parameters():  # leave zero-init: make every path carry signal
        p.data.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("make", [lambda: tiny_base(16, 32).unet, lambda: tiny_sr(8, 32).unet])
def test_padded_tokens_do_not_matter_but_text_does(make):
    cfg = make()
    model = perturbed(cfg)
    n = cfg.image_size
    x = torch.randn(2, 3, n, n)
    t = torch.tensor([100.0, 700.0])
    text = torch.randn(2, 6, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    extra = (torch.randn(2, 3, n, n), torch.tensor([0.0, 200.0])) if cfg.lowres_cond else ()
    with torch.no_grad():
        out = model(x, t, text, mask, *extra)
        garbage = text.clone()
        garbage[~mask] = torch.randn(int((~mask).sum()), 32) * 100
        assert torch.allclose(model(x, t, garbage, mask, *extra), out, atol=1e-5)
        other = text.clone()
        other[:, 0] += 1.0
        assert not torch.allclose(model(x, t, other, mask, *extra), out, atol=1e-4)
        assert out.shape == x.shape


def test_empty_mask_is_well_defined():
    model = perturbed(tiny_base(16, 32).unet)
    with torch.no_grad():
        out = model(
            torch.randn(2, 3, 16, 16),
            torch.tensor([1.0, 2.0]),
            torch.zeros(2, 4, 32),
            torch.zeros(2, 4, dtype=torch.bool),
        )
    assert torch.isfinite(out).all()


def test_sr_unet_uses_lowres_and_aug_level():
    cfg = tiny_sr(8, 32).unet
    model = perturbed(cfg)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([300.0])
    text, mask = torch.randn(1, 3, 32), torch.ones(1, 3, dtype=torch.bool)
    low = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        base = model(x, t, text, mask, low, torch.tensor([0.0]))
        assert not torch.allclose(model(x, t, text, mask, low + 1, torch.tensor([0.0])), base)
        assert not torch.allclose(model(x, t, text, mask, low, torch.tensor([250.0])), base)
    with pytest.raises(ValueError, match="lowres"):
        model(x, t, text, mask)


@pytest.mark.parametrize("efficient", [False, True])
def test_architecture_is_configuration(efficient):
    cfg = UNetConfig(
        image_size=32,
        channels=16,
        channel_mults=(1, 2, 2, 4),
        num_res_blocks=(1, 2, 1, 3),
        attn_resolutions=(8,),
        cross_attn_resolutions=(4,),
        text_dim=24,
        norm_groups=8,
        downsample_first=efficient,
        scale_skip=efficient,
        attn_head_dim=8,
    )
    model = UNet(cfg)
    out = model(
        torch.randn(2, 3, 32, 32),
        torch.tensor([0.0, 5.0]),
        torch.randn(2, 3, 24),
        torch.ones(2, 3, dtype=torch.bool),
    )
    assert out.shape == (2, 3, 32, 32)
    n_attn = sum(1 for m in model.modules() if type(m).__name__ == "Attention")
    self_attn = sum(1 for m in model.modules() if type(m).__name__ == "Attention" and m.self_attend)
    assert n_attn > self_attn >= 2  # cross-only layers at 4 px, self+text at 8 px, the middle


def test_bad_inputs_are_clear_errors():
    model = UNet(tiny_base(16, 32).unet)
    with pytest.raises(ValueError, match="16x16"):
        model(
            torch.randn(1, 3, 8, 8),
            torch.zeros(1),
            torch.randn(1, 2, 32),
            torch.ones(1, 2, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="text encoder"):
        model(
            torch.randn(1, 3, 16, 16),
            torch.zeros(1),
            torch.randn(1, 2, 7),
            torch.ones(1, 2, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="num_res_blocks"):
        UNetConfig(channel_mults=(1, 2), num_res_blocks=(1, 1, 1))
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(image_size=18, channel_mults=(1, 2, 4))
    with pytest.raises(ValueError, match="unknown"):
        UNetConfig.from_dict({"chanels": 3})


def test_bf16_autocast_runs():
    model = UNet(tiny_base(16, 32).unet)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(
            torch.randn(2, 3, 16, 16),
            torch.zeros(2),
            torch.randn(2, 3, 32),
            torch.ones(2, 3, dtype=torch.bool),
        )
    assert torch.isfinite(out.float()).all()


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = tiny_base(16, 32).unet
    model = UNet(cfg)
    for p in model.parameters():  # zero-initialised output layers would give zero gradients
        p.data.add_(torch.randn_like(p) * 0.05)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 700.0])
    text, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.activation_checkpointing = ckpt
        model(x, t, text, mask).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))
    assert any(g.abs().sum() > 0 for g in grads[0])
