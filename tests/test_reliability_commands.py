"""Untrusted input, third round (issue 36): what the newer commands do with bad input. Spacing
lists against a model's schedule, flags that exclude each other, ``export`` of two base
stages, index fields of the wrong type, weights changed in place (the stamp's sample) and
``imagen verify``. Every refusal is one line on stderr and exit status 2."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_cli_errors import reseal
from test_reliability_inputs import edit_json
from test_sample_cli import model_dir  # noqa: F401 - fixture

from imagen.cli.main import main
from imagen.models import validate


@pytest.fixture(scope="module")
def short_schedule(tmp_path_factory, model_dir):  # noqa: F811
    """The tiny model with every stage trained on a 100-step schedule."""
    m = Path(shutil.copytree(model_dir, tmp_path_factory.mktemp("short") / "m"))
    for k in range(3):
        edit_json(m / f"stage{k}" / "config.json", lambda c: c["diffusion"].update(timesteps=100))
    reseal(m)
    return m


def one_line(capsys, code):
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "x", "--spacing", "fast27"],
        ["sample", "x", "--spacing", "smart27", "--sampler", "ddpm"],
        ["sample", "x", "--spacing", "smart27", "--sampler", "ddim"],
        ["eval", "shapes", "--num", "1", "--spacing", "super27"],
    ],
    ids=["fast27", "smart27-ddpm", "smart27-ddim", "eval-super27"],
)
def test_a_named_spacing_is_checked_against_the_models_schedule(
    short_schedule, tmp_path, capsys, argv
):
    code = main([*argv, "--model", str(short_schedule), "--out", str(tmp_path / "o")])
    err = one_line(capsys, code)
    assert "stage 0: the timestep list" in err and "this stage's has 100" in err
    assert not (tmp_path / "o").exists()
    argv = ["sample", "x", "--model", str(short_schedule), "--steps", "200"]
    err = one_line(capsys, main([*argv, "--out", str(tmp_path / "o")]))
    assert "cannot sample with 200 steps from a 100-step schedule" in err


def test_flags_that_exclude_each_other_are_refused(model_dir, tmp_path, capsys):  # noqa: F811
    argv = ["sample", "x", "--model", str(model_dir), "--low-memory", "--no-low-memory"]
    err = one_line(capsys, main([*argv, "--out", str(tmp_path / "o")]))
    assert "--low-memory and --no-low-memory exclude each other" in err


def test_export_of_two_base_stages_names_the_problem(model_dir, tmp_path, capsys):  # noqa: F811
    s0 = str(model_dir / "stage0")
    err = one_line(capsys, main(["export", s0, s0, "--out", str(tmp_path / "m")]))
    assert "stage 1 is a base stage" in err and "None" not in err
    assert not (tmp_path / "m").exists()


def test_an_index_field_of_the_wrong_type_is_refused(model_dir, tmp_path, capsys):  # noqa: F811
    m = Path(shutil.copytree(model_dir, tmp_path / "m"))
    edit_json(m / "model_index.json", lambda i: i["text_encoder"].update(dim="wide"))
    argv = ["sample", "x", "--model", str(m), "--steps", "1", "--out", str(tmp_path / "o")]
    assert "text_encoder.dim must be a positive integer, got 'wide'" in one_line(capsys, main(argv))


def test_export_out_over_a_stray_index_is_refused(model_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_index.json").write_text("[1, 2, 3]")
    argv = ["export", str(model_dir / "stage0"), "--out", str(out), "--overwrite"]
    assert "is not an imagen model index" in one_line(capsys, main(argv))
    assert (out / "model_index.json").read_text() == "[1, 2, 3]"


# ---- weights changed in place ----------------------------------------------------------
def test_an_edit_in_place_with_the_mtime_restored_is_caught(tmp_path, monkeypatch):
    """A large file's stamp stands in for its hash; the stamp holds a hash of a sample of the
    file (first and last MiB, 16 blocks between), so an edit there that keeps size, mtime and
    inode is caught; an edit elsewhere shows to a full hash (``imagen verify``)."""
    monkeypatch.setattr(validate, "STAMP_BYTES", 1000)
    monkeypatch.setattr(validate, "_HASHED", {})
    path = tmp_path / "big.safetensors"
    path.write_bytes(os.urandom(8 << 20))
    digest = validate.file_sha256(path)
    assert validate.checked_sha256(path) == digest  # hashed in full, stamped
    st = path.stat()

    def edit(offset):
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 1]))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_ino == st.st_ino

    for offset in (100, (8 << 20) - 100, (1 << 20) + ((6 << 20) * 5) // 16):  # head, tail, block
        edit(offset)
        monkeypatch.setattr(validate, "_HASHED", {})  # a new process
        with pytest.raises(ValueError, match="does not match its sha256"):
            validate.verify_file(path, digest, tmp_path / "model_index.json")
        edit(offset)  # back as it was: the stamp stands in again
        assert validate.checked_sha256(path) == digest
    edit(3 << 20)  # between the sampled blocks: only a full hash sees it
    assert validate.checked_sha256(path) == digest
    assert validate.checked_sha256(path, full=True) != digest


def test_verify_rehashes_every_file(model_dir, tmp_path, capsys):  # noqa: F811
    m = Path(shutil.copytree(model_dir, tmp_path / "m"))
    assert main(["verify", str(m)]) == 0
    assert "all match their sha256" in capsys.readouterr().out
    path = m / "stage1" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    (m / "stage2" / "config.json").unlink()
    err = one_line(capsys, main(["verify", str(m)]))
    assert "2 of 6 file(s) do not match" in err
    assert "stage1/model.safetensors (damaged)" in err and "stage2/config.json (missing)" in err
    index = json.loads((m / "model_index.json").read_text())
    del index["checksums"]
    (m / "model_index.json").write_text(json.dumps(index))
    assert "records no checksums" in one_line(capsys, main(["verify", str(m)]))


# ---- sample --overwrite: the earlier run stays whole until the new one is in place ---------
def run_files(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).iterdir()) if p.is_file()}


def test_a_failed_overwrite_leaves_the_earlier_run_whole(model_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "out"
    argv = ["sample", "a red circle", "--model", str(model_dir), "--steps", "1", "--out", str(out)]
    assert main(argv) == 0
    before = run_files(out)
    capsys.readouterr()
    (out / "0001.png").mkdir()  # the new run's second image cannot go there
    err = one_line(capsys, main([*argv, "--num-images", "2", "--seed", "5", "--overwrite"]))
    assert "0001.png there is a directory where this run writes a file" in err  # before work
    assert run_files(out) == before and (out / "0001.png").is_dir()
    (out / "0001.png").rmdir()
    import imagen.utils.outputs as output

    real, calls = os.replace, []

    def full_disk_at_the_second_move_in(src, dst):
        if Path(src).parent.name.endswith(".partial") and Path(dst).parent == out:
            calls.append(dst)
            if len(calls) == 2:
                raise OSError(28, "No space left on device", str(dst))
        real(src, dst)

    monkeypatch.setattr(output.os, "replace", full_disk_at_the_second_move_in)
    assert main([*argv, "--num-images", "2", "--seed", "5", "--overwrite"]) == 2
    assert len(calls) > 2 and run_files(out) == before  # the earlier run, moved back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left aside
    monkeypatch.setattr(output.os, "replace", real)
    assert main([*argv, "--num-images", "2", "--seed", "5", "--overwrite"]) == 0
    rows = (out / "manifest.jsonl").read_text().splitlines()
    assert len(rows) == 2 and sorted(run_files(out)) == [
        "0000.png",
        "0001.png",
        "grid.png",
        "manifest.jsonl",
    ]
