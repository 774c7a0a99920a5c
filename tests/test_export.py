"""Exports: validated before anything is written, written atomically (a failing export leaves a
model already there byte for byte as it was), portable encoder paths, and stages taken from an
existing model directory."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from test_checkpoints import flip_bytes
from test_training import config

from imagen.cli.main import main
from imagen.models import model_dir
from imagen.models.cascade import load_cascade
from imagen.models.model_dir import check_text_encoder, portable_text_encoder
from imagen.training.export import export_model
from imagen.training.rundir import RunDirectory
from imagen.training.trainer import train_stage


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    train_stage(config(steps=3), 0, root / "base", progress=False)
    train_stage(config(steps=2, stage="sr"), 0, root / "sr", progress=False)
    train_stage(config(steps=5, lr=3e-3), 0, root / "base2", progress=False)
    return root


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def copy_run(runs: Path, name: str, dest: Path, **options) -> Path:
    """A copy of run ``name`` whose stage options are edited."""
    shutil.copytree(runs / name, dest)
    opts = json.loads((dest / "training_options.json").read_text())
    stage = opts["config"]["stages"][0]["stage"]
    for key, value in options.items():
        section, field = key.split("__")
        stage[section][field] = value
    (dest / "training_options.json").write_text(json.dumps(opts))
    return dest


def test_a_failing_export_leaves_the_existing_model_untouched(runs, tmp_path, monkeypatch):
    out = tmp_path / "model"
    export_model([runs / "base", runs / "sr"], out)
    before = snapshot(out)
    other_encoder = copy_run(runs, "sr", tmp_path / "sr-hash", text_encoder__name="hash-32b")
    misfit = copy_run(runs, "sr", tmp_path / "sr-misfit", unet__channels=12)
    damaged = tmp_path / "base-damaged"
    shutil.copytree(runs / "base", damaged)
    flip_bytes(RunDirectory(damaged).checkpoints()[-1] / "ema.safetensors")
    failures = [
        ([runs / "sr", runs / "base"], ValueError, "only the first stage of a cascade"),
        ([runs / "base", misfit], ValueError, "does not match the model configuration"),
        ([damaged, runs / "sr"], ValueError, "no usable checkpoint.*ema.safetensors"),
        ([runs / "base", tmp_path / "nothing"], FileNotFoundError, "neither a training run"),
    ]
    for items, error, message in failures:
        with pytest.raises(error, match=message):
            export_model(items, out)
        assert snapshot(out) == before
    mixed = export_model([runs / "base", other_encoder], tmp_path / "mixed")  # one per stage
    records = [
        json.loads((mixed / s / "config.json").read_text())["text_encoder"]
        for s in ("stage0", "stage1")
    ]
    assert records[1]["name"] == "hash-32b" != records[0]["name"]
    real_save = model_dir.save_tensors

    def disk_full(tensors, path, dtype=None):
        if path.parent.name == "stage1":
            raise OSError(28, "No space left on device")
        real_save(tensors, path, dtype)

    monkeypatch.setattr(model_dir, "save_tensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_model([runs / "base2", runs / "sr"], out)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_export_refuses_to_replace_what_is_not_a_model(runs, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty and not a model directory"):
        export_model([runs / "base"], out)
    assert (out / "todo.txt").read_text() == "keep me"
    assert main(["export", str(runs / "sr"), "--out", str(tmp_path / "m")]) == 0  # upscales only
    argv = ["sample", "a red circle", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "s")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "only upscales" in err[-1] and not (tmp_path / "s").exists()


def test_a_stage_is_replaced_without_the_runs_of_the_others(runs, tmp_path):
    v1 = export_model([runs / "base", runs / "sr"], tmp_path / "v1", dtype=torch.int8)
    v1_index = json.loads((v1 / "model_index.json").read_text())
    sr_bytes = (v1 / "stage1" / "model.safetensors").read_bytes()
    v2 = export_model([runs / "base2", v1 / "stage1"], tmp_path / "v2")  # fp16 for the new base
    index = json.loads((v2 / "model_index.json").read_text())
    assert (v2 / "stage1" / "model.safetensors").read_bytes() == sr_bytes  # int8 stays int8
    assert index["training"][1] == v1_index["training"][1]
    assert index["training"][0]["run_dir"] == "base2" and index["training"][0]["steps"] == 5
    stages = load_cascade(v2).stages
    assert stages[0].unet.conv_in.weight.dtype == torch.float32  # loaded from fp16
    out = load_cascade(v2).sample(["a red circle"], generator=torch.Generator().manual_seed(0))
    assert out[0].shape == (1, 3, 32, 32)
    # in place: the model being replaced is also the source of the stage kept
    export_model([runs / "base2", v1 / "stage1"], v1)
    assert (v1 / "stage1" / "model.safetensors").read_bytes() == sr_bytes
    assert json.loads((v1 / "model_index.json").read_text())["training"][0]["steps"] == 5
    flip_bytes(v1 / "stage1" / "model.safetensors")
    with pytest.raises(ValueError, match="stage1/model.safetensors does not match its sha256"):
        export_model([runs / "base", v1 / "stage1"], tmp_path / "v3")
    (v1 / "stage7").mkdir()
    (v1 / "stage7" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no stage 'stage7'"):
        export_model([runs / "base", v1 / "stage7"], tmp_path / "v3")


def test_export_skips_a_damaged_newest_checkpoint_with_a_warning(runs, tmp_path, caplog):
    run = tmp_path / "base"
    shutil.copytree(runs / "base2", run)  # checkpoints at steps 3 and 5
    flip_bytes(RunDirectory(run).checkpoints()[-1] / "ema.safetensors")
    with caplog.at_level(logging.WARNING):
        root = export_model([run], tmp_path / "m")
    assert "skipping a damaged checkpoint" in caplog.text
    record = json.loads((root / "model_index.json").read_text())["training"][0]
    assert record["checkpoint"] == "step_00000003" and record["steps"] == 3


def test_local_encoder_paths_are_stored_absolute(runs, tmp_path, monkeypatch):
    (tmp_path / "work" / "encoders" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    run = copy_run(runs, "base", tmp_path / "run", text_encoder__name="./encoders/mine")
    root = export_model([run], tmp_path / "m")
    where = str(tmp_path / "work" / "encoders" / "mine")
    index = json.loads((root / "model_index.json").read_text())
    assert index["text_encoder"]["name"] == where
    stage_cfg = json.loads((root / "stage0" / "config.json").read_text())
    assert stage_cfg["text_encoder"]["name"] == where  # the stage agrees with the index
    monkeypatch.chdir(tmp_path)
    assert check_text_encoder(index["text_encoder"], root)["name"] == where
    shutil.rmtree(tmp_path / "work" / "encoders")
    with pytest.raises(FileNotFoundError, match=f"text encoder of .* is not found at {where}"):
        check_text_encoder(index["text_encoder"], root)
    with pytest.raises(FileNotFoundError, match="relative path, from the current directory"):
        check_text_encoder({"name": "../old/relative"}, root)
    for name in ("minilm", "hash-32", "google/t5-v1_1-base"):  # names, not paths
        assert portable_text_encoder({"name": name})["name"] == name
        assert check_text_encoder({"name": name}, root)["name"] == name


def test_model_directories_record_checksums(runs, tmp_path):
    root = export_model([runs / "base", runs / "sr"], tmp_path / "m")
    index = json.loads((root / "model_index.json").read_text())
    assert sorted(index["checksums"]) == [
        f"stage{k}/{f}" for k in range(2) for f in ("config.json", "model.safetensors")
    ]
    for name, digest in index["checksums"].items():
        assert model_dir.file_sha256(root / name) == digest


def test_export_sets_the_stages_default_sampling(runs, tmp_path, capsys):
    from imagen.cli.main import main

    model = tmp_path / "m"
    assert main(["export", str(runs / "base"), str(runs / "sr"), "--out", str(model)]) == 0
    args = ["--steps-per-stage", "7,3", "--guidance-per-stage", "2.5,1", "--precision", "bf16"]
    args += ["--threshold", "static"]
    out = tmp_path / "tuned"
    assert (
        main(["export", str(model / "stage0"), str(model / "stage1"), "--out", str(out), *args])
        == 0
    )
    for k, (steps, guidance) in enumerate([(7, 2.5), (3, 1.0)]):
        cfg = json.loads((out / f"stage{k}" / "config.json").read_text())["sampling"]
        assert (cfg["steps"], cfg["guidance"], cfg["precision"]) == (steps, guidance, "bf16")
        assert cfg["threshold"]["mode"] == "static"
        same = (out / f"stage{k}" / "model.safetensors").read_bytes()
        assert same == (model / f"stage{k}" / "model.safetensors").read_bytes()
    assert (
        main(["export", str(model / "stage0"), "--out", str(out), "--steps-per-stage", "1,2"]) == 2
    )
    assert "2 values for 1 stages" in capsys.readouterr().err


def test_export_records_notes(runs, tmp_path, capsys):
    from imagen.cli.main import main

    notes = tmp_path / "notes.json"
    notes.write_text(json.dumps({"notes": {"stage0": "why it was trained"}}))
    out = tmp_path / "m"
    assert main(["export", str(runs / "base"), "--out", str(out), "--notes", str(notes)]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["notes"] == {"stage0": "why it was trained"}
    notes.write_text("[1, 2]")
    assert main(["export", str(runs / "base"), "--out", str(out), "--notes", str(notes)]) == 2
    assert "expected a JSON object" in capsys.readouterr().err
