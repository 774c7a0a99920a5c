"""The Stable Diffusion x4 upscaler as a latent stage III: `imagen import` of a tiny random x4
pipeline built here (tests/x4_tiny.py), alone and after tiny IF stages, against diffusers'
StableDiffusionUpscalePipeline as the reference; fast samplers, tiled VAE decoding, low-memory
loading and fine-tuning of the latent stage. The three-stage cascade's parity at every stage
is in tests/test_if_import.py."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")

from if_tiny import SR_SIZE, make_if_pipelines  # noqa: E402
from x4_tiny import make_x4_pipeline  # noqa: E402

from imagen.cli.main import main  # noqa: E402

PROMPT = "a red cat on a blue sofa"
LOW = 16  # the input size of the x4 upscaler imported alone here (64 px out)


@pytest.fixture(scope="module")
def x4(tmp_path_factory):
    """The tiny x4 pipeline, the model `imagen import` makes of it alone, and a three-stage
    model (tiny IF I + II + x4)."""
    root = tmp_path_factory.mktemp("x4")
    base, sr = make_if_pipelines(root)
    pipe = make_x4_pipeline(root)
    argv = ["import", str(pipe), "--out", str(root / "alone"), "--x4-size", str(LOW)]
    assert main(argv) == 0
    assert main(["import", str(base), str(sr), str(pipe), "--out", str(root / "three")]) == 0
    return pipe, root / "alone", root / "three"


def _reference(pipe_dir, image, prompt, seeds, classic=False, **kw):
    """diffusers' upscaler on ``image`` (a [-1, 1] tensor batch), images in [0, 1]."""
    from diffusers import StableDiffusionUpscalePipeline
    from diffusers.models.attention_processor import AttnProcessor

    pipe = StableDiffusionUpscalePipeline.from_pretrained(pipe_dir)
    if classic:  # the classic attention: diffusers' own float spread against SDPA
        pipe.unet.set_attn_processor(AttnProcessor())
        pipe.vae.set_attn_processor(AttnProcessor())
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    kw = {"noise_level": 100, **kw}
    return pipe(prompt=prompt, image=image, generator=generators, output_type="pt", **kw).images


def test_import_makes_a_latent_stage_with_its_own_text_encoder(x4):
    pipe, alone, three = x4
    index = json.loads((three / "model_index.json").read_text())
    assert [r["pipeline"] for r in index["imported"]][-1] == "StableDiffusionUpscalePipeline"
    assert "RAIL++" in index["licence"] and "DeepFloyd" in index["licence"]
    cfg = json.loads((three / "stage2" / "config.json").read_text())
    assert cfg["space"]["kind"] == "vae" and cfg["lowres_size"] == SR_SIZE
    assert (
        cfg["text_encoder"]["kind"] == "clip" and index["text_encoder"]["padding"] == "max_length"
    )
    s = cfg["sampling"]
    assert (s["sampler"], s["steps"], s["guidance"], s["threshold"]["mode"]) == (
        "ddim",
        75,
        9.0,
        "none",
    )
    assert round(s["aug_level"] * 999) == 100 and round(s["max_aug_level"] * 999) == 350
    assert (s["spacing_offset"], s["final_alpha"]) == (1, "first")
    vae = pipe / "vae" / "diffusion_pytorch_model.safetensors"
    assert (three / "stage2" / "space.safetensors").samefile(vae)  # linked, as the U-Net is
    assert json.loads((alone / "stage0" / "config.json").read_text())["lowres_size"] == LOW


def test_upscale_alone_matches_diffusers_on_a_png(x4, tmp_path):
    """`imagen upscale IMG --model X4 --fp32` is the pipeline at the stored noise level; the
    model only upscales, so `imagen sample` says so in one line."""
    pipe, alone, _ = x4
    low = tmp_path / "low.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (LOW, LOW, 3), dtype=np.uint8)).save(low)
    argv = ["upscale", str(low), "--prompt", PROMPT, "--model", str(alone), "--fp32"]
    assert main([*argv, "--seed", "4", "--out", str(tmp_path / "up")]) == 0
    pixels = np.asarray(Image.open(tmp_path / "up" / "0000.png").convert("RGB")).astype(int)
    image = torch.from_numpy(np.asarray(Image.open(low)).astype(np.float32) / 127.5 - 1)
    ref = _reference(pipe, image.permute(2, 0, 1)[None], PROMPT, [4])[0]
    ref_pixels = (ref * 255).round().permute(1, 2, 0).numpy().astype(int)
    assert pixels.shape == (4 * LOW, 4 * LOW, 3)
    assert np.abs(pixels - ref_pixels).max() <= 1
    assert main(["sample", PROMPT, "--model", str(alone), "--out", str(tmp_path / "s")]) == 2


def test_ddim_at_20_steps_matches_diffusers_and_dpmpp_solves_the_same_ode(x4):
    """v-prediction converted to x0 / eps: our DDIM at 20 steps is diffusers' DDIM at 20; DPM-
    Solver++ at 20 steps lands near the 75-step DDIM solution of the same noise."""
    from imagen.pipeline import ImagenPipeline

    pipe_dir, alone, _ = x4
    ours = ImagenPipeline.from_pretrained(alone, dtype=torch.float32)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (LOW, LOW, 3), np.uint8))
    tensor = torch.from_numpy(np.asarray(image).astype(np.float32) / 127.5 - 1).permute(2, 0, 1)

    def run(**kw):
        out = ours.upscale(image, PROMPT, seed=7, **kw).images[0]
        return np.asarray(out).astype(float)

    from imagen.models.sampling import SamplingOverrides

    ddim20 = run(overrides=SamplingOverrides(steps=20))
    ref = _reference(pipe_dir, tensor[None], PROMPT, [7], num_inference_steps=20)[0]
    assert np.abs(ddim20 - (ref * 255).round().permute(1, 2, 0).numpy()).max() <= 1
    full = run()
    dpmpp = run(overrides=SamplingOverrides(sampler="dpmpp", steps=20))
    other_seed = np.asarray(ours.upscale(image, PROMPT, seed=8).images[0]).astype(float)
    assert np.abs(dpmpp - full).mean() < 0.5 * np.abs(other_seed - full).mean()


def test_tiled_decode_is_close_to_the_whole_decode():
    """A random-weight VAE at 512 px: tiles of 64 latent px (256 px, 25% overlap, blended, as
    diffusers' enable_tiling) against one decode (memory-efficient attention: the 16,384^2
    score matrix is never built). Measured here: mean 0.018, max 0.36 on outputs of std 0.33
    (each tile normalises with its own GroupNorm statistics)."""
    from imagen.models.spaces import SpaceConfig, VAESpace

    record = dict(
        block_out_channels=[8, 16, 16],
        norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4,
    )
    torch.manual_seed(0)
    space = VAESpace(SpaceConfig(kind="vae", config=record, scaling_factor=0.08333))
    latents = torch.randn(1, 4, 128, 128) * 0.08333
    whole = space.decode(latents)
    space.tile = 64
    tiled = space.decode(latents)
    assert whole.shape == tiled.shape == (1, 3, 512, 512)
    diff = (whole - tiled).abs()
    assert diff.mean() < 0.025 and diff.max() < 0.5, (diff.mean(), diff.max())


def test_low_memory_loads_the_vae_and_each_encoder_in_turn(x4):
    from imagen.models.cascade import load_cascade
    from imagen.pipeline import ImagenPipeline

    _, _, three = x4
    want = ImagenPipeline(load_cascade(three))(PROMPT, steps=[3, 2, 2], seed=2).images[0]
    lean = load_cascade(three, low_memory=True, weights_dtype=torch.float32)
    assert all(v is None for v in lean.encoders.loaded.values())
    got = ImagenPipeline(lean)(PROMPT, steps=[3, 2, 2], seed=2).images[0]
    assert np.array_equal(np.asarray(got), np.asarray(want))
    assert all(v is None for v in lean.encoders.loaded.values())  # released after encoding
    assert all(next(s.unet.parameters()).is_meta for s in lean.stages)
    assert got.size == (4 * SR_SIZE, 4 * SR_SIZE)


def test_noise_level_is_the_integer_diffusers_takes(x4, tmp_path, capsys):
    _, alone, _ = x4
    low = tmp_path / "low.png"
    Image.new("RGB", (LOW, LOW), (200, 30, 30)).save(low)
    base = ["upscale", str(low), "--prompt", PROMPT, "--model", str(alone), "--steps", "2"]
    assert main([*base, "--noise-level", "351", "--out", str(tmp_path / "a")]) == 2
    assert "noise level 351" in capsys.readouterr().err
    assert main([*base, "--noise-level", "20", "--out", str(tmp_path / "b")]) == 0
    rows = [json.loads(r) for r in (tmp_path / "b" / "manifest.jsonl").read_text().splitlines()]
    assert round(rows[0]["stages"][-1]["aug_level"] * 999) == 20


def test_fine_tune_the_x4_stage_resume_and_export(x4, tmp_path):
    """`init: M:2`: v-prediction loss on the frozen VAE's latents, random noise levels as
    class labels; the loss falls, a stopped run resumes bit-exactly, the export samples."""
    from imagen.training.config import load_cascade_config
    from imagen.training.export import export_model
    from imagen.training.rundir import RunDirectory
    from imagen.training.trainer import train_stage
    from imagen.utils.tensors import load_tensors

    _, _, three = x4
    cfg = tmp_path / "tune.yaml"
    train = (
        "{batch_size: 4, max_steps: 8, lr: 2.0e-3, warmup_steps: 1, aug_max: 0.35, "
        "sample_every: 0, checkpoint_every: 4, log_every: 1, precision: fp32}"
    )
    cfg.write_text(
        f"data: {{kind: shapes}}\nstages:\n  - init: {three}:0\n  - init: {three}:1\n"
        f"  - init: {three}:2\n    train: {train}\n"
    )
    config = load_cascade_config(cfg)
    train_stage(config, 2, tmp_path / "straight", progress=False)
    train_stage(config, 2, tmp_path / "split", max_steps=4, progress=False)
    train_stage(config, 2, tmp_path / "split", resume=True, progress=False)
    a, b = (
        load_tensors(RunDirectory(tmp_path / r).checkpoints()[-1] / "model.safetensors")
        for r in ("straight", "split")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [r["loss"] for r in RunDirectory(tmp_path / "straight").read_log()]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    out = export_model(
        [three / "stage0", three / "stage1", tmp_path / "straight"], tmp_path / "tuned"
    )
    assert (out / "stage2" / "space.safetensors").is_file()
    argv = ["sample", PROMPT, "--model", str(out), "--steps", "2", "--out", str(tmp_path / "s")]
    assert main(argv) == 0
    assert Image.open(tmp_path / "s" / "0000.png").size == (4 * SR_SIZE, 4 * SR_SIZE)
    stage = RunDirectory(tmp_path / "straight").stage_config()
    assert replace(stage.sampling) == stage.sampling and stage.text_encoder["kind"] == "clip"


def test_a_clip_text_encoder_stored_only_as_a_pickle_is_refused(x4, tmp_path):
    """The stage's CLIP text encoder loads from safetensors only, as T5 does: a folder that
    holds only pytorch_model.bin is an error, and the pickle is never opened."""
    import shutil

    from imagen.text.clip import CLIPTextEncoder

    pipe_dir = x4[0]
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    shutil.copy(pipe_dir / "text_encoder" / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle anyone should open")
    shutil.copytree(pipe_dir / "tokenizer", tmp_path / "tokenizer")
    with pytest.raises(OSError, match="could not load the CLIP text encoder.*safetensors"):
        CLIPTextEncoder(str(folder), tokenizer=str(tmp_path / "tokenizer"))
    assert CLIPTextEncoder(str(pipe_dir / "text_encoder"), str(pipe_dir / "tokenizer")).dim == 32
