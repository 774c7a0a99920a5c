import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_cascade import make_cascade

from imagen.cli.main import main
from imagen.pipeline import ImagenPipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model") / "m"
    make_cascade().save(d)
    return d


def run(args, capsys):
    code = main(args)
    return code, capsys.readouterr()


def test_sample_writes_pngs_manifest_and_grid_deterministically(model_dir, tmp_path, capsys):
    args = [
        "sample",
        "a red circle on the left",
        "a blue square at the top",
        "--model",
        str(model_dir),
        "--steps",
        "3",
        "--num-images",
        "2",
        "--seed",
        "7",
        "--batch-size",
        "3",
    ]
    code, _ = run([*args, "--out", str(tmp_path / "a")], capsys)
    assert code == 0
    rows = [
        json.loads(line) for line in (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()
    ]
    assert [r["seed"] for r in rows] == [7, 8, 9, 10]
    assert [r["prompt"] for r in rows] == ["a red circle on the left"] * 2 + [
        "a blue square at the top"
    ] * 2
    files = sorted(p.name for p in (tmp_path / "a").glob("0*.png"))
    assert files == sorted(r["path"] for r in rows)
    for r in rows:
        assert list(Image.open(tmp_path / "a" / r["path"]).size) == r["size"] == [64, 64]
    assert (tmp_path / "a" / "grid.png").is_file()
    assert all(r["warnings"] == [] for r in rows)  # a model without a vocabulary: none
    run([*args, "--out", str(tmp_path / "b")], capsys)
    for r in rows:
        assert (tmp_path / "a" / r["path"]).read_bytes() == (
            tmp_path / "b" / r["path"]
        ).read_bytes()
    # image j is reproducible alone from its seed
    run(
        [
            "sample",
            "a blue square at the top",
            "--model",
            str(model_dir),
            "--steps",
            "3",
            "--seed",
            "9",
            "--out",
            str(tmp_path / "c"),
        ],
        capsys,
    )
    a = np.asarray(Image.open(tmp_path / "a" / "0002.png")).astype(int)
    c = np.asarray(Image.open(tmp_path / "c" / "0000.png")).astype(int)
    assert np.abs(a - c).max() <= 1


def test_prompts_file_and_per_stage_settings(model_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red circle on the left\n\n a green square in the center \n")
    code, _ = run(
        [
            "sample",
            "--prompts-file",
            str(tmp_path / "p.txt"),
            "--model",
            str(model_dir),
            "--out",
            str(tmp_path / "o"),
            "--steps-per-stage",
            "2,3,1",
            "--guidance-per-stage",
            "3,2,1",
            "--sampler",
            "ddim",
            "--save-stages",
        ],
        capsys,
    )
    assert code == 0
    rows = [
        json.loads(line) for line in (tmp_path / "o" / "manifest.jsonl").read_text().splitlines()
    ]
    assert [r["prompt"] for r in rows] == [
        "a red circle on the left",
        "a green square in the center",
    ]
    assert [s["steps"] for s in rows[0]["stages"]] == [2, 3, 1]
    assert len(rows[0]["stage_paths"]) == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "no prompt"),
        (["x", "--steps", "0"], "positive integer"),
        (["x", "--sampler", "euler"], "unknown sampler 'euler'"),
        (["x", "--steps-per-stage", "2,2"], "3 stages"),
        (["x", "--strength", "1.5"], "strength"),
        (["x", "--mask", "nowhere.png"], "not found"),
    ],
)
def test_bad_input_exits_nonzero_and_writes_nothing(model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    try:
        code, captured = run(
            ["sample", *extra, "--model", str(model_dir), "--out", str(out)], capsys
        )
    except SystemExit as e:  # argparse's own errors
        code, captured = e.code, capsys.readouterr()
    assert code != 0 and message in captured.err
    assert not out.exists()


def test_bad_model_dir_and_empty_prompts_file(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    code, captured = run(
        ["sample", "x", "--model", str(tmp_path), "--out", str(tmp_path / "o")], capsys
    )
    assert (
        code == 2
        and "not an imagen model directory" in captured.err
        and len(captured.err.splitlines()) == 1
    )
    code, captured = run(
        ["sample", "--prompts-file", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")],
        capsys,
    )
    assert code == 2 and "empty" in captured.err
    assert not (tmp_path / "o").exists()


def test_pipeline_img2img_and_inpainting(model_dir):
    pipe = ImagenPipeline.from_pretrained(model_dir)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    out = pipe("a red circle", steps=3, init_image=init, strength=0.0)
    assert np.abs(np.asarray(out.images[0]).astype(int) - np.asarray(init).astype(int)).max() <= 1
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    out = pipe("a red circle", steps=3, init_image=init, strength=1.0, mask=mask)
    got, want = np.asarray(out.images[0]).astype(int), np.asarray(init).astype(int)
    keep = np.asarray(mask) == 0
    assert np.abs(got[keep] - want[keep]).max() <= 1 and np.abs(got[~keep] - want[~keep]).mean() > 5


def test_pipeline_returns_every_stage_and_validates(model_dir):
    pipe = ImagenPipeline.from_pretrained(model_dir)
    out = pipe(
        ["a", "b"],
        steps=2,
        return_all_stages=True,
        guidance=[2.0, 1.0, 1.0],
        threshold_percentile=0.99,
    )
    assert [im.size for im in (s[0] for s in out.stages)] == [(16, 16), (32, 32), (64, 64)]
    with pytest.raises(ValueError, match="no prompts"):
        pipe([])
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe("a", sampler="euler")
    assert isinstance(pipe.cascade.stages[0].unet.conv_in.weight, torch.Tensor)


def test_compile_falls_back_to_eager_when_compiling_fails(model_dir, monkeypatch, caplog):
    def broken_compile(module):
        def run(*args, **kwargs):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager = ImagenPipeline.from_pretrained(model_dir)("a red circle", steps=2, seed=3)
    compiled = ImagenPipeline.from_pretrained(model_dir, compile=True)
    out = compiled("a red circle", steps=2, seed=3)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(eager.images[0]))
    assert "torch.compile failed" in caplog.text
    assert all(st.compiled.compiled is None for st in compiled.cascade.stages)


def test_eval_shapes_records_its_report_in_the_model(model_dir, tmp_path, capsys):
    import shutil

    from imagen.evaluation.shapes import GROUPS, eval_shapes
    from imagen.pipeline import ImagenPipeline

    m = tmp_path / "m"
    shutil.copytree(model_dir, m)
    code, out = run(["eval", "shapes", "--num", "1", "--model", str(m), "--record"], capsys)
    assert code == 0, out.err
    index = json.loads((m / "model_index.json").read_text())
    assert index["evaluation"]["command"] == "imagen eval shapes --num 1 --seed 0"
    assert index["evaluation"]["accuracy"] == json.loads(out.out)["accuracy"]
    check = index["evaluation_check"]
    assert check["groups"] == list(GROUPS) == index["evaluation"]["groups"]
    again = eval_shapes(
        ImagenPipeline.from_pretrained(m), check["num_per_group"], seed=0, groups=GROUPS
    )
    assert again["accuracy"] == check["accuracy"]
    code, out = run(
        ["eval", "shapes", "--num", "1", "--model", "org/not-local", "--record"], capsys
    )
    assert code == 2 and "local model directory" in out.err
