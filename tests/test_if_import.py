"""DeepFloyd IF in diffusers format: `imagen import` of tiny random IF pipelines built here,
then `imagen sample` and `imagen upscale` against diffusers' own pipelines as the reference
(same seeds, at IF's defaults), the fast samplers on the same stages, and the Hub cache."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")

from if_tiny import BASE_SIZE, SR_SIZE, make_if_pipelines  # noqa: E402

from imagen.cli.main import main  # noqa: E402

PROMPTS = ["a red cat on a blue sofa", "A Lighthouse at night  "]
SEED = 11


@pytest.fixture(scope="module")
def tiny_if(tmp_path_factory):
    """The tiny IF pipelines and the model directory `imagen import` makes of them."""
    root = tmp_path_factory.mktemp("if")
    base, sr = make_if_pipelines(root)
    assert main(["import", str(base), str(sr), "--out", str(root / "model")]) == 0
    return base, sr, root / "model"


def _pixels(image: torch.Tensor) -> np.ndarray:
    """A [-1, 1] image as the uint8 pixels a PNG of it holds."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_import_records_sources_links_weights_and_if_defaults(tiny_if):
    base, sr, model = tiny_if
    index = json.loads((model / "model_index.json").read_text())
    assert [r["pipeline"] for r in index["imported"]] == ["IFPipeline", "IFSuperResolutionPipeline"]
    assert "non-commercial" in index["licence"]
    te = index["text_encoder"]
    assert (te["max_length"], te["padding"], te["dim"]) == (77, "max_length", 32)
    weights = model / "stage0" / "model.safetensors"
    assert weights.samefile(base / "unet" / "diffusion_pytorch_model.safetensors")  # linked
    stage0, stage1 = (json.loads((model / s / "config.json").read_text()) for s in index["stages"])
    assert stage0["network"] == stage1["network"] == "diffusers-unet"
    s0, s1 = stage0["sampling"], stage1["sampling"]
    assert (s0["sampler"], s0["steps"], s0["guidance"], s0["spacing"]) == (
        "ddpm",
        100,
        7.0,
        "leading",
    )
    assert (s0["threshold"]["percentile"], s0["threshold"]["max_scale"]) == (0.95, 1.5)
    assert (s1["steps"], s1["guidance"], s1["threshold"]["max_scale"]) == (50, 4.0, 1.0)
    assert round(s1["aug_level"] * 999) == 250 and stage1["lowres_size"] == BASE_SIZE


def test_sample_matches_diffusers_at_every_stage(tiny_if, tmp_path):
    """2 prompts x 2 seeds at IF's defaults (100 + 50 DDPM steps, guidance 7 and 4)."""
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    base, sr, model = tiny_if
    out = tmp_path / "ours"
    args = ["sample", *PROMPTS, "--model", str(model), "--num-images", "2", "--seed", str(SEED)]
    assert main([*args, "--fp32", "--save-stages", "--out", str(out)]) == 0
    prompts = [p for p in PROMPTS for _ in range(2)]
    seeds = [SEED + j for j in range(4)]  # image j of the call uses seed + j
    ref1 = IFPipeline.from_pretrained(base)(
        prompts, generator=_generators(seeds), output_type="pt"
    ).images
    ref2 = IFSuperResolutionPipeline.from_pretrained(sr)(
        image=ref1, prompt=prompts, generator=_generators(seeds), output_type="pt"
    ).images
    for j in range(4):
        for ours, ref in ((out / f"{j:04d}_stage0.png", ref1[j]), (out / f"{j:04d}.png", ref2[j])):
            diff = np.abs(_png(ours).astype(int) - _pixels(ref).astype(int))
            assert diff.max() <= 1, f"image {j}: {ours.name} differs by {diff.max()} levels"
    assert _png(out / "0000.png").shape == (SR_SIZE, SR_SIZE, 3)


def test_upscale_matches_the_diffusers_super_resolution_call(tiny_if, tmp_path):
    from diffusers import IFSuperResolutionPipeline

    _, sr, model = tiny_if
    low = tmp_path / "low.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (BASE_SIZE, BASE_SIZE, 3), dtype=np.uint8)).save(low)
    args = ["upscale", str(low), "--prompt", PROMPTS[0], "--model", str(model), "--fp32"]
    assert main([*args, "--seed", "4", "--out", str(tmp_path / "up")]) == 0
    image = torch.from_numpy(_png(low).astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    ref = IFSuperResolutionPipeline.from_pretrained(sr)(
        image=image, prompt=PROMPTS[0], generator=torch.Generator().manual_seed(4), output_type="pt"
    ).images[0]
    diff = np.abs(_png(tmp_path / "up" / "0000.png").astype(int) - _pixels(ref).astype(int))
    assert diff.max() <= 1


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_fast_samplers_run_on_if_stages(tiny_if, sampler):
    from imagen.pipeline import ImagenPipeline

    pipe = ImagenPipeline.from_pretrained(tiny_if[2])
    cfgs = pipe.sampling_configs()
    start = pipe.cascade.stages[0].timesteps(cfgs[0])[0]
    ab = float(pipe.cascade.stages[0].schedule.alpha_bar[start])
    assert 0.5 * np.log(ab / (1 - ab)) >= -5.1  # lambda clipped for the cosine schedule
    out = pipe(PROMPTS[0], sampler=sampler, steps=[8, 4], seed=1, return_all_stages=True)
    assert [im.size for im in (out.stages[0][0], out.images[0])] == [(16, 16), (32, 32)]
    assert out.sampling[0].ddpm_variance == "learned_range"  # stored, unused by these samplers


def test_import_from_a_prefilled_hub_cache_offline(tiny_if, tmp_path, monkeypatch):
    base, _, _ = tiny_if
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny--if-i"
    shutil.copytree(base, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["import", "tiny/if-i", "--out", str(tmp_path / "m")]) == 0
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["imported"][0]["revision"] == revision
    assert main(["import", "tiny/absent", "--out", str(tmp_path / "n")]) == 2


def test_if_timestep_lists_are_diffusers(tiny_if):
    from diffusers.pipelines.deepfloyd_if import timesteps

    from imagen.diffusion.timestep_lists import IF_TIMESTEPS

    for name, values in IF_TIMESTEPS.items():
        assert list(values) == getattr(timesteps, f"{name}_timesteps")


def _folder(root, n=6):
    from if_tiny import CORPUS

    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        colour = rng.integers(0, 256, 3, dtype=np.uint8)
        Image.fromarray(np.broadcast_to(colour, (BASE_SIZE, BASE_SIZE, 3)).copy()).save(
            root / f"{i}.png"
        )
        (root / f"{i}.txt").write_text(CORPUS[i % len(CORPUS)])
    return root


def test_fine_tune_an_imported_stage_resume_and_export(tiny_if, tmp_path):
    """`init:` an imported IF base on an image-text folder: the loss falls, resume is
    bit-exact, the exported model (fixed variance after eps-only training) samples."""
    from imagen.models.cascade import load_cascade
    from imagen.text.cache import EmbeddingCache, build_cache
    from imagen.training.config import parse_cascade_config
    from imagen.training.export import export_model
    from imagen.training.rundir import RunDirectory
    from imagen.training.trainer import train_stage
    from imagen.utils.tensors import load_tensors

    model = tiny_if[2]
    train = dict(batch_size=4, lr=2e-3, warmup_steps=1, checkpoint_every=4, sample_every=0)
    folder = _folder(tmp_path / "data")
    cfg = parse_cascade_config(
        {
            "data": {"kind": "folder", "path": str(folder)},
            "stages": [{"init": f"{model}:0", "train": {**train, "max_steps": 8, "log_every": 1}}],
        }
    )
    assert cfg.text_encoder.padding == "max_length"  # the init model's T5, as IF uses it
    encoder = load_cascade(model).text_encoder
    build_cache([p.read_text() for p in folder.glob("*.txt")], encoder, tmp_path / "emb")
    cache = EmbeddingCache.open(tmp_path / "emb", encoder)
    assert {r.shape[0] for r in cache.lookup(list(cache.where))} == {77}  # padded, all kept
    args = dict(text_encoder=encoder, embedding_cache=cache, progress=False)
    train_stage(cfg, 0, tmp_path / "straight", **args)
    train_stage(cfg, 0, tmp_path / "split", max_steps=4, **args)
    train_stage(cfg, 0, tmp_path / "split", resume=True, **args)
    lines = (tmp_path / "straight" / "log.jsonl").read_text().splitlines()
    log = [json.loads(x)["loss"] for x in lines]
    assert np.mean(log[-3:]) < np.mean(log[:3])
    a, b = (
        load_tensors(RunDirectory(tmp_path / r).checkpoints()[-1] / "model.safetensors")
        for r in ("straight", "split")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    export_model([tmp_path / "straight", model / "stage1"], tmp_path / "tuned", dtype=torch.float32)
    tuned = load_cascade(tmp_path / "tuned")
    assert tuned.stages[0].config.sampling.ddpm_variance == "posterior"  # recorded
    assert torch.equal(tuned.stages[0].null_text[0], load_cascade(model).stages[0].null_text[0])
    out = main(
        [
            "sample",
            "a red cat",
            "--model",
            str(tmp_path / "tuned"),
            "--steps",
            "3",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    assert out == 0 and (tmp_path / "s" / "0000.png").is_file()


def test_negative_prompt_matches_diffusers_and_edits_run(tiny_if):
    """A negative prompt is T5(negative) as in diffusers (10 leading steps here); image-to-
    image and inpainting run on the imported stages."""
    from diffusers import IFPipeline

    from imagen.pipeline import ImagenPipeline

    base, _, model = tiny_if
    pipe = ImagenPipeline.from_pretrained(model, dtype=torch.float32)  # bf16 CPUs: as diffusers
    kw = dict(steps=[10, 4], seed=5, return_all_stages=True, negative_prompt="a blue sofa")
    ours = pipe(PROMPTS[0], **kw).stages[0][0]
    ref = IFPipeline.from_pretrained(base)(
        PROMPTS[0],
        negative_prompt="a blue sofa",
        num_inference_steps=10,
        generator=torch.Generator().manual_seed(5),
        output_type="pt",
    ).images[0]
    assert np.abs(np.asarray(ours).astype(int) - _pixels(ref).astype(int)).max() <= 1
    init = Image.new("RGB", (SR_SIZE, SR_SIZE), (200, 30, 30))
    mask = Image.new("L", (SR_SIZE, SR_SIZE), 0)
    mask.paste(255, (0, 0, SR_SIZE // 2, SR_SIZE))
    out = pipe(PROMPTS[0], steps=[6, 4], init_image=init, strength=0.5, mask=mask).images[0]
    right = np.asarray(out)[:, SR_SIZE // 2 + 2 :].astype(int)
    assert np.abs(right - [200, 30, 30]).max() <= 2  # the kept half is the input


def test_low_memory_holds_one_part_at_a_time(tiny_if):
    """Low-memory mode: nothing loaded up front, each part released after use; with float32
    weights it gives exactly the images of the ordinary load, with bf16 it runs."""
    from imagen.models.cascade import load_cascade
    from imagen.pipeline import ImagenPipeline

    model = tiny_if[2]
    want = ImagenPipeline(load_cascade(model))(PROMPTS[0], steps=[3, 2], seed=2).images[0]
    lean = load_cascade(model, low_memory=True, weights_dtype=torch.float32)
    assert lean._text_encoder is None and all(
        next(s.unet.parameters()).is_meta for s in lean.stages
    )
    got = ImagenPipeline(lean)(PROMPTS[0], steps=[3, 2], seed=2).images[0]
    assert np.array_equal(np.asarray(got), np.asarray(want))
    assert lean._text_encoder is None and all(
        next(s.unet.parameters()).is_meta for s in lean.stages
    )
    bf16 = ImagenPipeline.from_pretrained(model, low_memory=True)
    out = bf16(PROMPTS[0], steps=[2, 2], seed=2).images[0]
    assert out.size == (SR_SIZE, SR_SIZE)
    assert bf16.cascade.encoder_record()["padding"] == "max_length"


def test_export_steps_of_a_stage_stored_with_a_named_list(tiny_if, tmp_path):
    """`imagen export --steps-per-stage` on an IF stage whose default is one of IF's named
    timestep lists: the list gives way to trailing spacing, exactly as a sampling call's
    overrides resolve (one implementation: SamplingOverrides.apply)."""
    from imagen.models.model_dir import read_stage_config
    from imagen.models.sampling import SamplingOverrides
    from imagen.pipeline import ImagenPipeline
    from imagen.training.export import export_model

    model = tiny_if[2]
    fast = tmp_path / "fast"
    stages = [model / "stage0", model / "stage1"]
    export_model(stages, fast, sampling=SamplingOverrides(spacing=["fast27", None]))
    stored = read_stage_config(fast / "stage0").sampling
    assert (stored.spacing, stored.steps) == ("fast27", 27)
    argv = ["export", str(fast / "stage0"), str(fast / "stage1"), "--out", str(tmp_path / "ten")]
    assert main([*argv, "--steps-per-stage", "10,4"]) == 0
    exported = [read_stage_config(tmp_path / "ten" / f"stage{k}").sampling for k in (0, 1)]
    assert (exported[0].steps, exported[0].spacing) == (10, "trailing")
    called = ImagenPipeline.from_pretrained(fast).sampling_configs(SamplingOverrides(steps=[10, 4]))
    assert called == exported
