"""Sizes and user files (issue 26): work is streamed batch by batch whatever the number of
images, an earlier run in --out is never overwritten unasked, SIGTERM leaves nothing
half-written, and a resumed run's log does not repeat steps."""

import argparse
import gc
import json
import os
import signal
import tracemalloc
import warnings
from pathlib import Path

import pytest
from PIL import Image
from test_sample_cli import model_dir  # noqa: F401 - fixture

from imagen.cli import sample as sample_cli
from imagen.cli.main import main
from imagen.pipeline import outputs as run_outputs


def names(d):
    return sorted(p.name for p in Path(d).iterdir())


def rows(d):
    return [json.loads(x) for x in (Path(d) / "manifest.jsonl").read_text().splitlines()]


def test_an_earlier_run_is_kept_unless_overwrite_replaces_it(model_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeffa red circle\n\n  a blue square \n".encode())
    base = ["sample", "--model", str(model_dir), "--steps", "1", "--out", str(out)]
    assert main([*base, "--prompts-file", str(prompts), "--num-images", "2"]) == 0
    assert [r["prompt"] for r in rows(out)] == ["a red circle"] * 2 + ["a blue square"] * 2
    (out / "keep.txt").write_text("mine")
    before = {n: (out / n).read_bytes() for n in names(out)}
    stale = tmp_path / ".out.999999999.abcdefgh.partial"  # from a run killed outright
    stale.mkdir()
    capsys.readouterr()
    # a second run into the same directory: refused before any work, nothing touched
    assert main([*base, "another prompt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds an earlier run (6 file(s)" in err[0], err
    assert "--overwrite" in err[0]
    assert {n: (out / n).read_bytes() for n in names(out)} == before
    # --overwrite replaces that run as a whole: no image the manifest does not list
    assert main([*base, "another prompt", "--overwrite"]) == 0
    assert names(out) == ["0000.png", "grid.png", "keep.txt", "manifest.jsonl"]
    assert [r["prompt"] for r in rows(out)] == ["another prompt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert names(tmp_path) == ["out", "prompts.txt"]  # the stale staging directory is gone


def test_memory_depends_on_the_batch_not_on_the_number_of_images(
    model_dir,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    monkeypatch.setattr(run_outputs, "GRID_IMAGES", 2)
    live, real_add = [], run_outputs.RunWriter.add

    def images():
        gc.collect()
        with warnings.catch_warnings():  # isinstance on torch's deprecated proxies warns
            warnings.simplefilter("ignore")
            return sum(isinstance(o, Image.Image) for o in gc.get_objects())

    def add(self, out, sources=None):
        real_add(self, out, sources)
        del out
        live.append(images() - before)

    before = images()  # those other tests keep

    monkeypatch.setattr(run_outputs.RunWriter, "add", add)
    argv = ["sample", "a", "b", "--model", str(model_dir), "--steps", "1", "--num-images", "4"]
    assert main([*argv, "--batch-size", "2", "--out", str(tmp_path / "o")]) == 0
    assert len(live) == 4 and len(rows(tmp_path / "o")) == 8
    assert max(live) <= 2 + 2  # the grid's first 2, and at most one batch: never all 8


def test_prompts_are_read_lazily(tmp_path):
    path = tmp_path / "many.txt"
    path.write_text("".join(f"prompt number {i} of a long file\n" for i in range(100_000)))
    args = argparse.Namespace(
        prompts=[], prompts_file=str(path), num_images=10**9, batch_size=4, seed=0
    )
    tracemalloc.start()
    try:
        assert sample_cli.count_prompts(args) == 100_000
        prompts, seeds = next(sample_cli.work_batches(args))  # a billion images: one batch
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert prompts == ["prompt number 0 of a long file"] * 4 and seeds == [0, 1, 2, 3]
    assert peak < path.stat().st_size // 4, peak  # far less than the file (3.4 MB)


def test_sigterm_mid_run_leaves_nothing_behind(model_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    real_add = run_outputs.RunWriter.add

    def add(self, out, sources=None):  # SIGTERM (a real signal) once images are being written
        real_add(self, out, sources)
        assert list(tmp_path.glob(".out.*.partial/0001.png"))
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(run_outputs.RunWriter, "add", add)
    argv = ["sample", "x", "--model", str(model_dir), "--steps", "1", "--num-images", "1000000000"]
    with pytest.raises(SystemExit) as e:  # a billion images: the first batch comes at once
        main([*argv, "--batch-size", "2", "--out", str(tmp_path / "out")])
    assert e.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("imagen: terminated")
    assert names(tmp_path) == []  # no output, no staging directory
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is only for the run


def test_resume_truncates_the_log_to_the_checkpoint(tmp_path):
    import torch

    from imagen.training.rundir import RunDirectory

    rd = RunDirectory(tmp_path / "r")
    state = {"samples_seen": 12, "bad_steps": 0}
    opt = {"state": {}, "param_groups": []}
    w = {"w": torch.zeros(2)}
    rd.save_checkpoint(3, w, w, opt, state, keep=2)
    f = rd.open_log()  # a run killed after step 6: steps 4-6 are replayed on resume
    for s in range(1, 7):
        f.write(json.dumps({"step": s, "loss": 1.0 / s}) + "\n")
    f.write('{"step": 7, "lo')  # cut short by the kill
    f.close()
    assert rd.resume_checkpoint(True).name == "step_00000003"
    assert [r["step"] for r in rd.read_log()] == [1, 2, 3]
    assert (rd.path / "log.jsonl").read_text().endswith("\n")


@pytest.mark.parametrize("kind", ["yaml", "json"])
def test_configs_parse_with_the_bounded_loader(tmp_path, kind):
    from imagen.training.config import load_cascade_config

    body = {"text_encoder": {"name": "hash-32"}, "stages": [{"preset": "tiny-base"}]}
    path = tmp_path / f"c.{kind}"
    path.write_text(json.dumps(body) if kind == "json" else "\ufeff" + json.dumps(body))
    assert load_cascade_config(path).stages[0].stage.unet.image_size == 16


def test_eval_shapes_out_refuses_an_earlier_evaluation(tmp_path, capsys):
    from imagen.cli.main import main

    out = tmp_path / "ev"
    out.mkdir()
    (out / "report.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    code = main(["eval", "shapes", "--num", "1", "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "earlier run" in err[0] and "--overwrite" in err[0]
    assert (out / "report.json").read_text() == "{}" and (out / "notes.txt").read_text() == "mine"
