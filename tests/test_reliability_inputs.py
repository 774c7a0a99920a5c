"""Untrusted inputs, second round (issue 26): model directories, images, configs and sizes.
Every case is one line on stderr, exit status 2, no traceback and nothing written; where the
point is bounded work, the case also shows that the work was refused before it was done."""

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file
from test_cli_errors import fill, paths, reseal, sample  # noqa: F401 - fixture
from test_sample_cli import model_dir  # noqa: F401 - fixture

from imagen.cli.main import main
from imagen.utils.tensors import dequantize, quantize_int8

TINY = {"text_encoder": {"name": "hash-32", "max_length": 12}}


def png_header(width, height, rows=None):
    """A 1-bit grayscale PNG claiming ``width`` x ``height``: with ``rows`` (all of them) a
    legal image, small on disk however large; without, its header only (a bomb's claim)."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    z = zlib.compressobj(9)
    row = b"\x00" + bytes((width + 7) // 8)
    body = b"".join(z.compress(row) for _ in range(rows or 1)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def edit_model(root, src, name, edit, seal=True):
    """A copy of model ``src`` at ``root/name`` with ``edit(copy)`` applied (and its
    checksums re-recorded, so that the checks behind them are reached)."""
    m = root / name
    shutil.copytree(src, m)
    edit(m)
    if seal:
        reseal(m)
    return str(m)


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_tensors(path, change):
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def int8_weights(m):
    path = m / "stage1" / "model.safetensors"
    save_file(quantize_int8(dequantize(load_file(str(path)))), str(path))


def first_weight(tensors, ndim=2, dtype=None):
    return next(
        k for k, v in tensors.items() if v.ndim >= ndim and (dtype is None or v.dtype == dtype)
    )


def shape_edit(m):
    def cut(t):
        k = first_weight(t)
        t[k] = t[k][:-1].contiguous()

    edit_tensors(m / "stage1" / "model.safetensors", cut)


def int8_shape_edit(m):
    import torch

    int8_weights(m)

    def cut(t):
        k = first_weight(t, dtype=torch.int8)
        t[k] = t[k][:, :-1].contiguous()  # the scale still fits: only dequantisation would fail

    edit_tensors(m / "stage1" / "model.safetensors", cut)


def dtype_edit(m):
    import torch

    def cast(t):
        k = first_weight(t)
        t[k] = t[k].to(torch.int32)

    edit_tensors(m / "stage1" / "model.safetensors", cast)


def bit_flip(m):
    path = m / "stage0" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def index_edit(change):
    return lambda m: edit_json(m / "model_index.json", change)


def config_edit(field, value):
    def change(cfg):
        cfg["unet"][field] = value

    return lambda m: edit_json(m / "stage1" / "config.json", change)


def symlink_out(m):
    outside = m.parent / f"{m.name}-outside"
    shutil.copytree(m / "stage1", outside)
    shutil.rmtree(m / "stage1")
    (m / "stage1").symlink_to(outside)


def deep_index(m):
    (m / "model_index.json").write_text("[" * 5000 + "]" * 5000)


def alias_bomb(n=9):
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, n):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, paths, model_dir):  # noqa: F811
    """The named inputs of the table below (beside those of test_cli_errors)."""
    d = tmp_path_factory.mktemp("hostile2")
    p = dict(paths)
    models = {
        "shape-edit": (shape_edit, True),
        "int8": (int8_weights, True),
        "int8-shape-edit": (int8_shape_edit, True),
        "dtype-edit": (dtype_edit, True),
        "bit-rot": (bit_flip, False),
        "bad-digest": (
            index_edit(lambda i: i["checksums"].update({"stage0/config.json": "ab"})),
            False,
        ),
        "checksum-list": (index_edit(lambda i: i.update(checksums=[1, 2])), False),
        "no-digest": (index_edit(lambda i: i["checksums"].pop("stage2/model.safetensors")), False),
        "negative-channels": (config_edit("channels", -4), True),
        "huge-channels": (config_edit("channels", 10**7), True),
        "stage-dotdot": (index_edit(lambda i: i["stages"].__setitem__(1, "../outside")), False),
        "stage-absolute": (index_edit(lambda i: i["stages"].__setitem__(1, "/tmp")), False),
        "stage-symlink": (symlink_out, False),
        "version-2": (index_edit(lambda i: i.update(version=2)), False),
        "version-text": (index_edit(lambda i: i.update(version="1")), False),
        "deep-index": (deep_index, False),
    }
    for name, (edit, seal) in models.items():
        p[name] = edit_model(d, model_dir, name, edit, seal)
    kept = Path(edit_model(d, model_dir, "with-user-file", lambda m: None, False))
    (kept / "my-notes.txt").write_text("mine")
    p["with-user-file"] = str(kept)
    (d / "bomb.png").write_bytes(png_header(30000, 30000))
    (d / "huge.png").write_bytes(png_header(12000, 12000, rows=12000))
    configs = {
        "stages-5.json": json.dumps({**TINY, "stages": [5]}),
        "stages-null.json": json.dumps({**TINY, "stages": [None]}),
        "stages-map.json": json.dumps({**TINY, "stages": {"preset": "tiny-base"}}),
        "preset-list.json": json.dumps({**TINY, "stages": [{"preset": ["tiny-base"]}]}),
        "train-5.json": json.dumps({**TINY, "stages": [{"preset": "tiny-base", "train": 5}]}),
        "deep.json": "[" * 5000 + "]" * 5000,
        "deep.yaml": "a: " + "[" * 5000 + "]" * 5000 + "\n",
        "deep40.yaml": "a: " + "[" * 40 + "]" * 40 + "\n",
        "deep.toml": "a = " + "[" * 5000 + "]" * 5000 + "\n",
        "many.json": json.dumps({**TINY, "stages": [{"preset": "tiny-base"}], "x": [0] * 300_000}),
        "bomb.yaml": alias_bomb() + "stages: [{preset: tiny-base, train: {betas: *a8}}]\n",
        "big.yaml": "# padding\n" * 500_000,
        "negative-unet.json": json.dumps(
            {**TINY, "stages": [{"preset": "tiny-base", "stage": {"unet": {"channels": -4}}}]}
        ),
        "pipe.json": json.dumps(
            {
                **TINY,
                "data": {"kind": "webdataset", "path": "pipe:echo hi"},
                "stages": [{"preset": "tiny-base"}],
            }
        ),
        "pipe-brace.json": json.dumps(
            {
                **TINY,
                "data": {"kind": "webdataset", "path": "{pipe:touch x,a.tar}"},
                "stages": [{"preset": "tiny-base"}],
            }
        ),
    }
    for ema in (5, -1, 1.0, 0):
        configs[f"ema-{ema}.json"] = json.dumps(
            {**TINY, "stages": [{"preset": "tiny-base", "train": {"ema_decay": ema}}]}
        )
    for name, text in configs.items():
        (d / name).write_text(text)
    for name in ("bomb.png", "huge.png", *configs):
        p[name] = str(d / name)
    (d / "one-line.txt").write_text("a red circle " * 100_000)  # 1.3 MB, no newline
    p["one-line.txt"] = str(d / "one-line.txt")
    p["dangling"] = str(d / "dangling")
    os.symlink(d / "nowhere" / "at-all", d / "dangling")
    return p


def train(config):
    return ["train", "{" + config + "}", "--stage", "0", "--out", "{out}"]


def upscale(*images, extra=()):
    return ["upscale", *images, "--prompt", "x", "--model", "{model}", "--out", "{out}", *extra]


CASES = [
    # model directories: damaged, edited or escaping
    (sample("--model", "{shape-edit}"), "does not fit the network of its config.json: tensor"),
    (sample("--model", "{int8-shape-edit}"), "does not fit the network of its config.json: tensor"),
    (["eval", "shapes", "--model", "{shape-edit}"], "does not fit the network"),
    (sample("--model", "{dtype-edit}"), "is stored as I32, not a float type"),
    (sample("--model", "{bit-rot}"), "does not match its sha256 in model_index.json (damaged"),
    (["eval", "shapes", "--model", "{bit-rot}"], "does not match its sha256"),
    (sample("--model", "{bad-digest}"), "is not a sha256 digest"),
    (sample("--model", "{checksum-list}"), "checksums must map file names"),
    (sample("--model", "{no-digest}"), "records no sha256 for stage2/model.safetensors"),
    (sample("--model", "{negative-channels}"), "unet.channels must be in [1, 16384], got -4"),
    (sample("--model", "{huge-channels}"), "unet.channels must be in [1, 16384]"),
    (sample("--model", "{stage-dotdot}"), "stage '../outside' is not a directory inside"),
    (sample("--model", "{stage-absolute}"), "stage '/tmp' is not a directory inside"),
    (sample("--model", "{stage-symlink}"), "stage 'stage1' leads outside the model"),
    (sample("--model", "{version-2}"), "format version 2 is not one this imagen reads"),
    (sample("--model", "{version-text}"), "format version '1' is not one"),
    (sample("--model", "{deep-index}"), "nested more than 32 levels deep"),
    # images from the command line: refused from the header, before decoding
    (sample("--init-image", "{bomb.png}"), "--init-image"),
    (sample("--init-image", "{huge.png}"), "12000 x 12000 pixels, over the limit of 64"),
    (sample("--init-image", "{red.png}", "--mask", "{huge.png}"), "--mask"),
    (upscale("{bomb.png}"), "image too large"),
    (upscale("{red.png}", "{huge.png}"), "image too large: its header claims 12000 x 12000"),
    # configs: shapes, types, ranges, sizes
    (
        train("stages-5.json"),
        "stages[0]: expected a mapping (preset, stage, train, data, init), got 5",
    ),
    (train("stages-null.json"), "stages[0]: expected a mapping"),
    (train("stages-map.json"), "stages: expected a list of stage entries"),
    (train("preset-list.json"), "stages[0].preset: expected a preset name, got ['tiny-base']"),
    (train("train-5.json"), "stages[0].train: expected a mapping, got 5"),
    (train("deep.json"), "nested more than 32 levels deep"),
    (train("deep.yaml"), "invalid YAML: exceeded maximum nesting depth"),  # libyaml's own
    (train("deep40.yaml"), "nested more than 32 levels deep"),
    (train("deep.toml"), "nested more than 32 levels deep"),
    (train("many.json"), "more than 200000 values"),
    (train("bomb.yaml"), "more than 200000 values (YAML aliases counted as expanded)"),
    (train("big.yaml"), "too large for a config (the limit is 4 MiB)"),
    (train("negative-unet.json"), "unet.channels must be in [1, 16384], got -4"),
    (train("pipe.json"), "'pipe:echo hi' is a pipe: shard, which runs a shell command"),
    (train("pipe-brace.json"), "'pipe:touch x' is a pipe: shard"),
    (train("ema-5.json"), "ema_decay must be in (0, 1), got 5"),
    (train("ema--1.json"), "ema_decay must be in (0, 1), got -1"),
    (train("ema-1.0.json"), "ema_decay must be in (0, 1), got 1.0"),
    (train("ema-0.json"), "ema_decay must be in (0, 1), got 0"),
    (["export", "{dir}", "--out", "{out}", "--notes", "{deep.json}"], "nested more than 32"),
    (["export", "{dir}", "--out", "{out}", "--notes", "{big.yaml}"], "too large"),
    # user files: an existing model holding the user's own files is not replaced
    (
        [
            "export",
            "{model}/stage0",
            "{model}/stage1",
            "{model}/stage2",
            "--out",
            "{with-user-file}",
        ],
        "not part of the model (my-notes.txt)",
    ),
    # seeds and output paths, checked before the model loads
    (sample("--seed", str(2**70)), "integer seed in [0, 2**64 - 1]"),
    (sample("--seed", "-1"), "integer seed in [0, 2**64 - 1], got -1"),
    (sample("--seed", str(2**64 - 1), "--num-images", "2"), "need seeds up to"),
    (upscale("{red.png}", extra=("--seed", str(2**64))), "integer seed"),
    (sample("--out", "{dangling}"), "which does not exist"),
    (["sample", "--prompts-file", "{one-line.txt}", "--out", "{out}"], "longer than 10000"),
]


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_hostile_input_is_one_line_and_status_2(hostile, capsys, monkeypatch, argv, message):
    decoded = []
    real_load = Image.Image.load

    def load(self):  # a refused image must never be decoded
        if self.size[0] * self.size[1] > 64_000_000:
            decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(Image.Image, "load", load)
    code = main(fill(argv, hostile))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert message in err, err
    assert not decoded
    out = Path(hostile["out"])
    assert not out.exists() and not list(out.parent.glob(".out.*"))


def test_a_sound_int8_model_still_loads_and_samples(hostile, tmp_path, capsys):
    argv = ["sample", "a", "--model", hostile["int8"], "--steps", "1", "--out", str(tmp_path / "o")]
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "0000.png").is_file()


def test_export_refusal_keeps_every_file(hostile):
    kept = Path(hostile["with-user-file"])
    assert (kept / "my-notes.txt").read_text() == "mine"
    assert sorted(p.name for p in kept.iterdir()) == [
        "model_index.json",
        "my-notes.txt",
        "stage0",
        "stage1",
        "stage2",
    ]


def test_hashing_the_bundled_model_is_cheap():
    """Each load hashes the model once; the bundled model is a few MB (tens of ms)."""
    from imagen.models.validate import file_sha256
    from imagen.pipeline import BUNDLED_MODEL

    files = sorted(Path(BUNDLED_MODEL).glob("*/*"))
    assert files and sum(f.stat().st_size for f in files) < 20 * 2**20
    index = json.loads((Path(BUNDLED_MODEL) / "model_index.json").read_text())
    for name, digest in index["checksums"].items():
        assert file_sha256(Path(BUNDLED_MODEL) / name) == digest


def test_large_weights_are_hashed_once_then_known_by_a_stamp(tmp_path, monkeypatch):
    from imagen.models import validate

    monkeypatch.setenv("IMAGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(validate, "STAMP_BYTES", 1000)
    monkeypatch.setattr(validate, "_HASHED", {})
    big, small = tmp_path / "big.safetensors", tmp_path / "small.json"
    big.write_bytes(b"x" * 5000)
    small.write_bytes(b"y" * 10)
    reads = []
    real = validate.file_sha256
    monkeypatch.setattr(validate, "file_sha256", lambda p: reads.append(p) or real(p))
    digest = real(big)
    for _ in range(2):
        assert validate.checked_sha256(big) == digest and validate.checked_sha256(small)
    monkeypatch.setattr(validate, "_HASHED", {})  # a new process: the stamp stands in
    assert validate.checked_sha256(big) == digest
    assert reads == [big, small, small]  # big: once; small: every time
    big.write_bytes(b"z" * 5000)  # an edit (a new mtime) is hashed again and caught
    with pytest.raises(ValueError, match="does not match its sha256"):
        validate.verify_file(big, digest, tmp_path / "model_index.json")
