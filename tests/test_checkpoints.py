"""Run state: checksummed checkpoints, falling back past damaged ones, the resume policy and
run directories that a failed start does not leave behind."""

import hashlib
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import save_file
from test_training import config

from imagen.cli.main import main
from imagen.models.stage import Stage
from imagen.models.unet import UNet
from imagen.training.checkpoint import (
    CheckpointError,
    _digest,
    read_checkpoint,
    verify_checkpoint,
)
from imagen.training.config import DataConfig
from imagen.training.optim import make_optimizer
from imagen.training.parallel import Dist, Parallel
from imagen.training.rundir import RunDirectory
from imagen.training.trainer import restore_checkpoint, train_stage
from imagen.utils.tensors import load_tensors

FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")


def weights(run, name="model"):
    return load_tensors(RunDirectory(run).checkpoints()[-1] / f"{name}.safetensors")


def same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def rewrite_state(ckpt, **changes):
    """Edit state.json and re-sign it, as a careless tool would."""
    state = json.loads((ckpt / "state.json").read_text())
    state.update(changes)
    state["state_sha256"] = _digest(state)
    (ckpt / "state.json").write_text(json.dumps(state))


def flip_bytes(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):  # inside the tensor data, not the header
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "model bytes flipped": lambda c: flip_bytes(c / "model.safetensors"),
    "ema truncated": lambda c: truncate(c / "ema.safetensors"),
    "optimizer missing": lambda c: (c / "optimizer.safetensors").unlink(),
    "state.json edited": lambda c: (c / "state.json").write_text(
        (c / "state.json").read_text().replace('"samples_seen": 24', '"samples_seen": 2400')
    ),
    "state.json cut": lambda c: truncate(c / "state.json"),
    "step claimed 999999": lambda c: rewrite_state(c, step=999999),
}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Nine steps in one go: what every resumed run below must reproduce bit for bit."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train_stage(config(steps=9), 0, run, progress=False)
    return weights(run), weights(run, "ema")


def test_checkpoints_record_their_checksums(tmp_path):
    train_stage(config(steps=3), 0, tmp_path / "r", progress=False)
    (ckpt,) = RunDirectory(tmp_path / "r").checkpoints()
    state = json.loads((ckpt / "state.json").read_text())
    for name in FILES:
        assert state["checksums"][name] == hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    assert state["state_sha256"] == _digest(state)
    assert verify_checkpoint(ckpt)["step"] == 3


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    tmp_path, straight, damage, caplog
):
    run = tmp_path / "r"
    train_stage(config(steps=9), 0, run, max_steps=6, progress=False)
    newest = RunDirectory(run).checkpoints()[-1]
    assert newest.name == "step_00000006"
    DAMAGE[damage](newest)
    with pytest.raises(CheckpointError):
        verify_checkpoint(newest)
    with caplog.at_level(logging.WARNING):
        summary = train_stage(config(steps=9), 0, run, resume=True, progress=False)
    assert "skipping a damaged checkpoint" in caplog.text
    assert "using " + str(run / "checkpoints" / "step_00000003") in caplog.text
    assert summary["step"] == 9
    # resumed from step 3: the result is that of the uninterrupted run, bit for bit
    assert same(weights(run), straight[0]) and same(weights(run, "ema"), straight[1])
    assert (run / "checkpoints" / "damaged-step_00000006").is_dir()  # kept for a post-mortem


def test_no_usable_checkpoint_is_a_one_line_error(tmp_path, capsys):
    run = tmp_path / "r"
    train_stage(config(steps=6), 0, run, progress=False)
    for ckpt in RunDirectory(run).checkpoints():
        flip_bytes(ckpt / "model.safetensors")
    with pytest.raises(ValueError, match="no usable checkpoint in .*step_00000006: model"):
        train_stage(config(steps=9), 0, run, resume=True, progress=False)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(config(steps=9).to_dict()))
    code = main(["train", str(cfg), "--stage", "0", "--out", str(run), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no usable checkpoint" in err[0]
    assert len(RunDirectory(run).checkpoints()) == 2  # nothing was deleted


@pytest.mark.parametrize("leftover", ["training_options.json", "log.jsonl", "checkpoints"])
def test_resume_refuses_a_previous_run_without_checkpoints(tmp_path, leftover):
    run = tmp_path / "r"
    train_stage(config(steps=3), 0, run, progress=False)
    for item in (
        "training_options.json",
        "log.jsonl",
        "checkpoints",
        "summary.json",
        "curves.png",
        "vocabulary.json",
    ):
        if item != leftover:
            p = run / item
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    if leftover == "checkpoints":
        shutil.rmtree(run / "checkpoints")
        (run / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match=f"holds a previous run \\({leftover}\\)"):
        train_stage(config(steps=6), 0, run, resume=True, progress=False)
    with pytest.raises(FileExistsError, match="holds a previous run"):
        train_stage(config(steps=6), 0, run, progress=False)
    assert sorted(p.name for p in run.iterdir()) == [leftover]  # left as it was


@pytest.mark.parametrize("exists", [False, True])
def test_resume_in_a_new_or_empty_directory_starts_fresh_and_says_so(tmp_path, exists, caplog):
    run = tmp_path / "new"
    if exists:
        run.mkdir()
    with caplog.at_level(logging.WARNING):
        summary = train_stage(config(steps=3), 0, run, resume=True, progress=False)
    assert summary["step"] == 3
    assert "holds no previous run; starting a new run at step 0" in caplog.text


def test_a_failed_start_leaves_no_run_directory(tmp_path, monkeypatch):
    run = tmp_path / "r"
    bad = DataConfig(kind="folder", path=str(tmp_path / "no-such-folder"))
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        train_stage(config(steps=3, data=bad), 0, run, resume=True, progress=False)
    assert not run.exists()

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(Stage, "loss", broken)
    with pytest.raises(RuntimeError):
        train_stage(config(steps=3), 0, run, resume=True, progress=False)
    assert not run.exists()
    monkeypatch.undo()
    assert train_stage(config(steps=3), 0, run, resume=True, progress=False)["step"] == 3
    assert (run / "training_options.json").is_file()


def test_a_superseded_damaged_checkpoint_is_moved_aside_not_deleted(tmp_path):
    run = tmp_path / "r"
    train_stage(config(steps=6), 0, run, progress=False)
    flip_bytes(RunDirectory(run).checkpoints()[-1] / "model.safetensors")
    # resumed from step 3, now checkpointing every 2 steps: step 4 supersedes step 6
    train_stage(config(steps=5, checkpoint_every=2), 0, run, resume=True, progress=False)
    assert [p.name for p in RunDirectory(run).checkpoints()] == [
        "step_00000004",
        "step_00000005",
    ]
    assert (run / "checkpoints" / "damaged-step_00000006" / "model.safetensors").is_file()


def test_state_json_is_validated(tmp_path):
    train_stage(config(steps=3), 0, tmp_path / "r", progress=False)
    (ckpt,) = RunDirectory(tmp_path / "r").checkpoints()
    original = (ckpt / "state.json").read_text()
    for changes, message in (
        ({"step": 999999}, "claims step 999999, not 3"),
        ({"samples_seen": -4}, "bad samples_seen"),
        ({"bad_steps": "two"}, "bad bad_steps"),
        ({"optimizer": None}, "no valid optimizer record"),
        ({"checksums": {"model.safetensors": "0"}}, "invalid checksums record"),
    ):
        rewrite_state(ckpt, **changes)
        with pytest.raises(CheckpointError, match=message):
            read_checkpoint(ckpt)
        (ckpt / "state.json").write_text(original)
    (ckpt / "state.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="does not hold a JSON object"):
        read_checkpoint(ckpt)


def make_old_format(ckpt, cfg):
    """Rewrite a checkpoint as version 0.1 wrote it: optimiser state keyed by parameter index
    (INDEX.FIELD), no checksums."""
    unet_cfg, train_cfg = cfg.stages[0].stage.unet, cfg.stages[0].train
    model, ema = UNet(unet_cfg), UNet(unet_cfg)
    opt = make_optimizer(train_cfg, list(model.parameters()), fused=True)
    restore_checkpoint(ckpt, model, ema, opt, Parallel("ddp", Dist(), torch.device("cpu")))
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for index, entry in sd["state"].items():
        for name, value in entry.items():
            (tensors if isinstance(value, torch.Tensor) else scalars)[f"{index}.{name}"] = value
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(ckpt / "optimizer.safetensors"))
    state = json.loads((ckpt / "state.json").read_text())
    for key in ("checksums", "state_sha256"):
        del state[key]
    state["optimizer"] = {"param_groups": sd["param_groups"], "scalars": scalars}
    (ckpt / "state.json").write_text(json.dumps(state))


def test_old_checkpoints_without_checksums_resume_exactly_with_a_warning(
    tmp_path, straight, caplog
):
    run = tmp_path / "r"
    train_stage(config(steps=9, keep_checkpoints=1), 0, run, max_steps=6, progress=False)
    (ckpt,) = RunDirectory(run).checkpoints()
    make_old_format(ckpt, config(steps=9))
    with caplog.at_level(logging.WARNING):
        train_stage(config(steps=9), 0, run, resume=True, progress=False)
    assert "has no checksums (written by an older version): accepted unverified" in caplog.text
    assert same(weights(run), straight[0]) and same(weights(run, "ema"), straight[1])


def test_old_checkpoints_are_still_checked_for_damage(tmp_path):
    train_stage(config(steps=3), 0, tmp_path / "r", progress=False)
    (ckpt,) = RunDirectory(tmp_path / "r").checkpoints()
    make_old_format(ckpt, config(steps=3))
    truncate(ckpt / "ema.safetensors")
    with pytest.raises(ValueError, match="step_00000003: ema.safetensors is not a complete"):
        RunDirectory(tmp_path / "r").latest_checkpoint()
    train_stage(config(steps=3), 0, tmp_path / "s", progress=False)
    (ckpt,) = RunDirectory(tmp_path / "s").checkpoints()
    make_old_format(ckpt, config(steps=3))
    model = load_tensors(ckpt / "model.safetensors")
    model[next(iter(model))].view(-1)[0] = float("nan")
    save_file(model, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match="non-finite values"):
        read_checkpoint(ckpt)
