import json

import pytest
import torch

from imagen.models.cascade import Cascade, load_cascade, read_index
from imagen.models.presets import tiny_base, tiny_sr
from imagen.models.sampling import SamplingConfig
from imagen.models.stage import Edit, Stage
from imagen.text.encoders import HashTextEncoder


def make_cascade(seed=0):
    torch.manual_seed(seed)
    enc = HashTextEncoder(32, 12)
    stages = [Stage(tiny_base(16, 32)), Stage(tiny_sr(16, 32)), Stage(tiny_sr(32, 32))]
    for st in stages:
        for p in st.parameters():
            p.data.add_(torch.randn_like(p) * 0.05)
        st.config.text_encoder = enc.config()
    return Cascade(enc, stages).eval()


PROMPTS = ["a red circle on the left", "a blue square above a green triangle"]


def test_three_stage_cascade_samples_the_right_shapes_deterministically():
    cascade = make_cascade()
    outs = cascade.sample(
        PROMPTS, generator=torch.Generator().manual_seed(0), return_all_stages=True
    )
    assert [tuple(o.shape) for o in outs] == [(2, 3, 16, 16), (2, 3, 32, 32), (2, 3, 64, 64)]
    assert all(o.abs().max() <= 1 for o in outs)
    again = cascade.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], outs[-1])
    other = cascade.sample(PROMPTS, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(other[0], outs[-1])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_every_sampler_runs_every_stage(sampler):
    cascade = make_cascade()
    cfgs = [SamplingConfig(sampler=sampler, steps=3, guidance=2.0) for _ in range(3)]
    out = cascade.sample(PROMPTS, sampling=cfgs, generator=torch.Generator().manual_seed(0))[0]
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()


def test_per_image_generators_make_images_independent_of_their_batch():
    cascade = make_cascade()
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    pair = cascade.sample(PROMPTS, generator=gens)[0]
    alone = cascade.sample(PROMPTS[1:], generator=[torch.Generator().manual_seed(6)])[0]
    assert torch.allclose(pair[1], alone[0], atol=1e-5)


def test_save_and_load_round_trip(tmp_path):
    cascade = make_cascade()
    cascade.save(tmp_path / "m", dtype=torch.float32)
    index = read_index(tmp_path / "m")
    assert (
        index["stages"] == ["stage0", "stage1", "stage2"]
        and index["text_encoder"]["name"] == "hash-32"
    )
    loaded = load_cascade(tmp_path / "m")
    a = cascade.sample(PROMPTS, generator=torch.Generator().manual_seed(3))[0]
    b = loaded.sample(PROMPTS, generator=torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b)


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    make_cascade().save(tmp_path / "m")
    cfg_path = tmp_path / "m" / "stage1" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["unet"]["channels"] = 12
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"stage1/config.json does not match its sha256"):
        load_cascade(tmp_path / "m")
    index_path = tmp_path / "m" / "model_index.json"  # a model written before checksums
    index_path.write_text(json.dumps({**read_index(tmp_path / "m"), "checksums": None}))
    with pytest.raises(
        ValueError, match=r"does not fit the network of its config.json: tensor \S+ has shape"
    ):
        load_cascade(tmp_path / "m")


def test_model_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an imagen model directory"):
        load_cascade(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_cascade(tmp_path)


def test_encoder_mismatch_is_refused():
    cascade = make_cascade()
    with pytest.raises(ValueError, match="trained with text encoder 'hash-32'"):
        Cascade(HashTextEncoder(16, 12), list(cascade.stages))


def test_stage_chain_must_fit():
    enc = HashTextEncoder(32, 12)
    with pytest.raises(ValueError, match="upsamples from 32"):
        Cascade(enc, [Stage(tiny_base(16, 32)), Stage(tiny_sr(32, 32))])
    with pytest.raises(ValueError, match="only the first stage of a cascade may be one"):
        Cascade(enc, [Stage(tiny_base(16, 32)), Stage(tiny_base(16, 32))])
    upscaler = Cascade(enc, [Stage(tiny_sr(16, 32))])  # a model that only upscales
    with pytest.raises(ValueError, match="only upscales"):
        upscaler.sample(["a red circle"])
    images = torch.zeros(1, 3, 16, 16)
    out = upscaler.sample(["a red circle"], lowres=images, seeds=[0])[0]
    assert out.shape == (1, 3, 32, 32)


def test_img2img_strength_zero_returns_the_input():
    cascade = make_cascade()
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    out = cascade.sample(
        PROMPTS[:1], edit=Edit(image, strength=0.0), generator=torch.Generator().manual_seed(0)
    )[0]
    assert torch.allclose(out, image, atol=1e-6)
    part = cascade.sample(
        PROMPTS[:1], edit=Edit(image, strength=0.5), generator=torch.Generator().manual_seed(0)
    )[0]
    full = cascade.sample(
        PROMPTS[:1], edit=Edit(image, strength=1.0), generator=torch.Generator().manual_seed(0)
    )[0]
    assert (part - image).abs().mean() < (full - image).abs().mean()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_inpainting_keeps_pixels_outside_the_mask(sampler):
    stage = make_cascade().stages[0]
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    text = HashTextEncoder(32, 12).encode(["a red circle"])
    out = stage.sample(
        text,
        sampling=SamplingConfig(sampler=sampler, steps=5),
        generator=torch.Generator().manual_seed(0),
        edit=Edit(image, 1.0, mask),
    )
    keep = mask.expand(1, 3, 16, 16) == 0
    assert torch.allclose(out[keep], image[keep], atol=1e-5)
    assert not torch.allclose(out[~keep], image[~keep], atol=1e-2)


def test_int8_export_is_half_the_size_and_close(tmp_path):
    cascade = make_cascade()
    cascade.save(tmp_path / "fp16")
    cascade.save(tmp_path / "int8", dtype=torch.int8)
    size = {
        k: (tmp_path / k / "stage0" / "model.safetensors").stat().st_size for k in ("fp16", "int8")
    }
    assert size["int8"] < 0.65 * size["fp16"]
    a = load_cascade(tmp_path / "fp16").stages[0].unet.state_dict()
    b = load_cascade(tmp_path / "int8").stages[0].unet.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=a[k].abs().max().item() / 100 + 1e-3), k
    x = cascade.sample(PROMPTS, generator=torch.Generator().manual_seed(0))[0]
    y = load_cascade(tmp_path / "int8").sample(PROMPTS, generator=torch.Generator().manual_seed(0))[
        0
    ]
    assert (x - y).abs().mean() < 0.05


def test_low_memory_runs_the_projects_unet_at_every_precision():
    """bf16 weights of the project's U-Net compute in float32 (it does not cast its inputs),
    on CPUs with and without fast bf16, with or without autocast."""
    from imagen.models.sampling import SamplingOverrides
    from imagen.pipeline import BUNDLED_MODEL, ImagenPipeline

    pipe = ImagenPipeline.from_pretrained(BUNDLED_MODEL, low_memory=True)
    for precision in ("fp32", "bf16"):  # bf16: autocast where the CPU has fast bf16
        out = pipe(
            "a red circle", steps=1, seed=0, overrides=SamplingOverrides(precision=precision)
        )
        assert out.images[0].size == (128, 128)
