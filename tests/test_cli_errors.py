"""Hostile input to the command line: every case is one line on stderr, exit status 2, no
traceback, and nothing half-written."""

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_sample_cli import model_dir  # noqa: F401 - fixture

from imagen.cli.main import main

TINY_CONFIG = {"text_encoder": {"name": "hash-32", "max_length": 12}}


@pytest.fixture(scope="module")
def paths(tmp_path_factory, model_dir):  # noqa: F811
    """Named inputs for the table: damaged models, bad configs, files in odd places."""
    d = tmp_path_factory.mktemp("hostile")
    p = {"model": str(model_dir), "out": str(d / "out"), "dir": str(d / "empty")}
    (d / "empty").mkdir()
    p["file"] = str(d / "a-file.txt")
    Path(p["file"]).write_text("not a directory\n")
    weights = (model_dir / "stage1" / "model.safetensors").read_bytes()
    for name, content in [
        ("truncated", weights[: len(weights) // 2]),
        ("garbage", b"\x00garbage" * 100),
        ("empty-weights", b""),
    ]:
        m = d / name
        shutil.copytree(model_dir, m)
        (m / "stage1" / "model.safetensors").write_bytes(content)
        p[name] = str(m)
    m = d / "no-weights"
    shutil.copytree(model_dir, m)
    (m / "stage2" / "model.safetensors").unlink()
    p["no-weights"] = str(m)
    m = d / "bad-index"
    m.mkdir()
    (m / "model_index.json").write_text("{not json")
    p["bad-index"] = str(m)
    m = d / "bad-stage-config"
    shutil.copytree(model_dir, m)
    cfg = json.loads((m / "stage0" / "config.json").read_text())
    cfg["sampling"]["guidance"] = "fast"
    (m / "stage0" / "config.json").write_text(json.dumps(cfg))
    reseal(m)
    p["bad-stage-config"] = str(m)
    configs = {
        "lr-fast": {"stages": [{"preset": "tiny-base", "train": {"lr": "fast"}}]},
        "batch-float": {"stages": [{"preset": "tiny-base", "train": {"batch_size": 1.5}}]},
        "list-number": {"stages": [{"preset": "tiny-base", "train": {"max_steps": [1, 2]}}]},
        "nan-guidance": {
            "stages": [{"preset": "tiny-base", "stage": {"sampling": {"guidance": float("nan")}}}]
        },
        "good": {"stages": [{"preset": "tiny-base", "train": {"max_steps": 1}}]},
    }
    for name, body in configs.items():
        (d / f"{name}.json").write_text(json.dumps({**TINY_CONFIG, **body}))
        p[name] = str(d / f"{name}.json")
    (d / "bad.yaml").write_text("stages:\n  - preset: tiny-base\n   train: [\n")
    (d / "bad.toml").write_text("[[stages]\npreset = 'tiny-base'\n")
    (d / "bad.json").write_text('{"stages": [,]}')
    (d / "binary.txt").write_bytes(b"\xff\xfe\xfa\x00")
    (d / "not-an-image.png").write_text("hello")
    (d / "not-torchscript.pt").write_bytes(b"\x00" * 64)
    for name in ("bad.yaml", "bad.toml", "bad.json", "binary.txt", "not-an-image.png"):
        p[name] = str(d / name)
    p["not-torchscript.pt"] = str(d / "not-torchscript.pt")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(d / "red.png")
    p["red.png"] = str(d / "red.png")
    return p


def reseal(model):
    """Record the current sha256 of every file of ``model`` in its index (an edit made on
    purpose, so that the checks behind the checksums are reached)."""
    from imagen.models.validate import file_sha256

    index = json.loads((model / "model_index.json").read_text())
    index["checksums"] = {k: file_sha256(model / k) for k in index["checksums"]}
    (model / "model_index.json").write_text(json.dumps(index))


def fill(argv, paths):
    """The arguments with each {name} replaced by the path of that name."""
    return [re.sub(r"\{([^{}]+)\}", lambda m: paths[m.group(1)], a) for a in argv]


def sample(*extra):
    return ["sample", "a red circle", "--model", "{model}", "--out", "{out}", *extra]


CASES = [
    # finite numbers on every float option
    (sample("--guidance", "nan"), "finite number"),
    (sample("--guidance", "inf"), "finite number"),
    (sample("--guidance", "-1"), "guidance must be"),
    (sample("--guidance-per-stage", "1,nan,1"), "finite numbers"),
    (sample("--threshold", "nan"), "finite number"),
    (sample("--threshold", "1.5"), "percentile"),
    (sample("--threshold", "clip"), "percentile in (0, 1] or dynamic, static or none"),
    (sample("--aug-level", "inf"), "finite number"),
    (sample("--aug-level", "1.0"), "aug_level"),
    (sample("--strength", "nan"), "finite number"),
    (sample("--strength", "2"), "[0, 1]"),
    # other bad values
    (sample("--steps", "abc"), "positive integer"),
    (sample("--steps-per-stage", "2,x"), "integers"),
    (sample("--steps-per-stage", "2,2"), "3 stages"),
    (sample("--seed", "1.5"), "integer seed"),
    (sample("--num-images", "0"), "positive integer"),
    (sample("--sampler", "euler"), "unknown sampler 'euler'"),
    (sample("--device", "bogus"), "unknown device"),
    (sample("--device", "cuda:99"), "cuda:99"),
    (sample("--device", "meta"), "unsupported device"),
    (["sample", "--model", "{model}", "--out", "{out}"], "no prompt"),
    (["sample", "--prompts-file", "{binary.txt}", "--out", "{out}"], "not UTF-8"),
    (["sample", "--prompts-file", "nowhere.txt", "--out", "{out}"], "not found"),
    (sample("--init-image", "{not-an-image.png}"), "not a readable image"),
    (sample("--init-image", "nowhere.png"), "not found"),
    (sample("--mask", "{red.png}"), "--mask needs --init-image"),
    # models that are not, or are damaged
    (sample("--model", "{dir}"), "not an imagen model directory"),
    (sample("--model", "nowhere/at-all/deep"), "not an imagen model directory"),
    (sample("--model", "nobody/no-such-model"), "Hugging Face Hub"),
    (sample("--model", "{bad-index}"), "invalid JSON"),
    (sample("--model", "{truncated}"), "damaged weights"),
    (sample("--model", "{garbage}"), "damaged weights"),
    (sample("--model", "{empty-weights}"), "damaged weights"),
    (sample("--model", "{no-weights}"), "no-weights/stage2"),  # names the missing file
    (sample("--model", "{bad-stage-config}"), "sampling.guidance: expected a number"),
    # outputs that cannot be written
    (sample("--out", "{file}"), "not a directory"),
    (sample("--out", "{file}/sub"), "is a file"),
    (sample("--out", "/proc/imagen-test-out"), "cannot write"),
    (["upscale", "nowhere.png", "--prompt", "x", "--model", "{model}"], "not found"),
    (["upscale", "{red.png}", "--prompt", " ", "--model", "{model}"], "--prompt is empty"),
    (["upscale", "{red.png}", "--prompt", "x", "--out", "{file}"], "not a directory"),
    # training configs and options
    (["train", "{lr-fast}", "--stage", "0", "--out", "{out}"], "lr: expected a number, got 'fast'"),
    (["train", "{batch-float}", "--stage", "0", "--out", "{out}"], "expected an integer, got 1.5"),
    (["train", "{list-number}", "--stage", "0", "--out", "{out}"], "expected an integer, got [1"),
    (["train", "{nan-guidance}", "--stage", "0", "--out", "{out}"], "finite number"),
    (["train", "{bad.yaml}", "--stage", "0", "--out", "{out}"], "line 3: invalid YAML"),
    (["train", "{bad.toml}", "--stage", "0", "--out", "{out}"], "invalid TOML"),
    (["train", "{bad.json}", "--stage", "0", "--out", "{out}"], "line 1: invalid JSON"),
    (["train", "nowhere.yaml", "--stage", "0", "--out", "{out}"], "not found"),
    (["train", "{good}", "--stage", "0", "--out", "{out}", "--lr", "nan"], "finite number"),
    (["train", "{good}", "--stage", "0", "--out", "{out}", "--lr", "fast"], "expected a number"),
    (["train", "{good}", "--stage", "0", "--out", "{out}", "--lr", "0"], "> 0"),
    (["train", "{good}", "--stage", "5", "--out", "{out}"], "has 1 stage"),
    (["train", "{good}", "--stage", "0", "--out", "{file}"], "not a directory"),
    (["train", "{good}", "--stage", "0", "--out", "{out}", "--device", "cuda:99"], "cuda:99"),
    (["embed", "{bad.yaml}", "--out", "{out}"], "invalid YAML"),
    (["export", "nowhere-run", "--out", "{out}"], "not found"),
    (["export", "{dir}", "--out", "{file}"], "not a directory"),
    # evaluation
    (["eval", "shapes", "--guidance", "nan"], "finite number"),
    (["eval", "shapes", "--model", "{dir}"], "not an imagen model directory"),
    (["eval", "shapes", "--model", "{model}", "--out", "{file}"], "not a directory"),
    (["eval", "fid", "--data", "{dir}", "--feature-network", "nowhere.pt"], "not found"),
    (
        ["eval", "fid", "--data", "{dir}", "--feature-network", "{not-torchscript.pt}"],
        "not a TorchScript",
    ),
    (["eval", "fid", "--data", "{dir}", "--cache-dir", "{file}"], "not a directory"),
    # the rest
    (["serve", "--port", "70000"], "65535"),
    (["serve", "--device", "bogus"], "unknown device"),
    (["demo", "--minutes", "nan"], "finite number"),
    (["demo", "--out", "{file}"], "not a directory"),
    (["prepare", "emoji", "{file}"], "not a directory"),
    (["push", "{dir}", "org/name"], "not an imagen model directory"),
    (["push", "{model}", "not a repo"], "not a Hub repo id"),
    (["no-such-command"], "invalid choice"),
]


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_is_one_line_and_status_2(paths, capsys, argv, message):
    code = main(fill(argv, paths))
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [ln for ln in err.strip().splitlines() if not ln.startswith("imagen: warning:")]
    assert "Traceback" not in err and len(errors) == 1, err  # warnings (torch's) come apart
    assert message in errors[0], err
    out = Path(paths["out"])
    assert not out.exists() and not list(out.parent.glob(".out.*"))


def test_a_busy_port_is_one_line(paths, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code = main(["serve", "--port", str(port), "--model", paths["model"]])
    err = capsys.readouterr().err
    assert code == 2 and "cannot listen" in err and len(err.strip().splitlines()) == 1


def test_a_full_disk_leaves_no_half_written_output(paths, tmp_path, capsys, monkeypatch):
    saved = []
    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        if len(saved) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        saved.append(fp)
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "full"
    argv = ["sample", "a", "b", "c", "--model", paths["model"], "--steps", "1", "--out", str(out)]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "No space left on device" in err[-1] and "Traceback" not in "".join(err)
    assert not out.exists() and not list(tmp_path.iterdir())  # no PNGs, no manifest, no staging
    # into an existing directory: what was there stays, nothing new lands
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    saved.clear()
    assert main(argv) == 2
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["full"]


def test_output_merges_into_an_existing_directory(paths, tmp_path, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["sample", "a", "--model", paths["model"], "--steps", "1", "--out", str(out)]
    assert main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0000.png", "grid.png", "keep.txt", "manifest.jsonl"]
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]  # no staging left behind


def test_debug_mode_and_genuine_bugs_keep_their_traceback(paths, monkeypatch):
    monkeypatch.setenv("IMAGEN_DEBUG", "1")
    with pytest.raises(Exception, match="guidance must be"):
        main(["sample", "x", "--model", paths["model"], "--out", paths["out"], "--guidance", "-1"])
    monkeypatch.delenv("IMAGEN_DEBUG")
    from imagen.cli import common

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setitem(common.COMMANDS, "demo", broken)
    with pytest.raises(KeyError):
        main(["demo", "--out", str(Path(paths["out"]).parent / "demo")])


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), **(env or {})},
        timeout=300,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (sample("--guidance", "nan"), "finite number"),
        (sample("--model", "{truncated}"), "damaged weights"),
        (["train", "{bad.yaml}", "--stage", "0", "--out", "{out}"], "invalid YAML"),
    ],
)
def test_as_a_process(paths, argv, message):
    r = run_cli("-m", "imagen", *fill(argv, paths))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_the_installed_script_entry_point(paths, tmp_path):
    # what pyproject's `imagen = "imagen.cli:main"` console script runs
    code = "import sys; from imagen.cli import main; sys.exit(main())"
    r = run_cli("-c", code, "--help")
    assert r.returncode == 0 and "sample" in r.stdout, r.stderr
    r = run_cli("-c", code, "sample", "--steps", "0", "x")
    assert r.returncode == 2 and "positive integer" in r.stderr
