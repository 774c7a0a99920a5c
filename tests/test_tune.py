"""`imagen tune` (issue 34) on the bundled Shapes cascade: four images of a purple circle
and the new token "zwx circle" (class prompt "a circle", with the model's own class images
for prior preservation) make the base draw the subject for "a zwx circle", which it did not
before. Measured with the Shapes checker on 16 seeds the tuning never saw. The longer
demonstration is benchmarks/tune_shapes.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("peft")

from imagen.cli.main import main  # noqa: E402

SUBJECT = "a purple circle in the center"
SEEDS = list(range(100, 112))


def subject_share(lora=None, prompt: str = "a zwx circle") -> float:
    """The share of base-stage images of ``prompt`` that are one purple circle (and nothing
    else), by the Shapes checker."""
    from imagen.data.checker import detect_objects
    from imagen.models.cascade import Cascade, load_cascade
    from imagen.models.lora import apply_loras
    from imagen.pipeline import resolve_model
    from imagen.utils.pil import tensor_to_pil

    full = load_cascade(resolve_model(None))
    if lora is not None:
        apply_loras(full, [str(lora)])
    base = Cascade(full.text_encoder, list(full.stages)[:1])
    out = base.sample([prompt] * len(SEEDS), seeds=SEEDS)[-1]
    hits = 0
    for image in out:
        objs = detect_objects(tensor_to_pil(image))
        hits += len(objs) == 1 and (objs[0].color, objs[0].shape) == ("purple", "circle")
    return hits / len(SEEDS)


def test_tune_teaches_the_bundled_base_a_new_token(tmp_path):
    from imagen.data.shapes import render_scene, scene_for_caption

    images = tmp_path / "subject"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        render_scene(scene_for_caption(SUBJECT, rng), 32).save(images / f"{i}.png")
    run = tmp_path / "run"
    argv = ["tune", str(images), "--token", "zwx circle", "--class-prompt", "a circle"]
    argv += [
        "--num-class-images",
        "4",
        "--steps",
        "60",
        "--lr",
        "3e-3",
        "--grid-steps",
        "2",
        "--out",
        str(run),
    ]
    assert main(argv) == 0  # 60 steps: v4.2's base, reading words better, took 30 to 0.25
    record = json.loads((run / "tune.json").read_text())
    assert record["prompt"] == "a zwx circle" and record["data"]["class_images"] == 4
    assert record["settings"] == {"rank": 8, "steps": 60, "lr": 3e-3, "batch_size": 8}
    assert (run / "tune_samples.png").is_file() and (
        run / "data" / "class" / "class.json"
    ).is_file()
    lora = run / "lora" / "pytorch_lora_weights.safetensors"
    assert json.loads((run / "lora" / "lora.json").read_text())["stage"] == 0
    before, after = subject_share(), subject_share(lora)
    assert before <= 0.25 and after >= 0.6, (before, after)
    assert main(["export", str(run), "--out", str(tmp_path / "again")]) == 0  # exportable
    assert main([*argv[:-2], "--out", str(run)]) == 2  # a previous run: --resume, or refused
