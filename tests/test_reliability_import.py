"""Untrusted input, third round (issue 36): ``imagen import`` treats a downloaded pipeline
folder as untrusted. Every case below is one line on stderr, exit status 2, no traceback,
nothing written and no pickle opened; a seeded fuzz of random mutations of a valid folder
keeps the rule "refused with one line, or imported and samples" (benchmarks/import_fuzz.py
runs a larger one). The tiny IF pipelines are built once for the module."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import struct
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")

from if_tiny import make_if_pipelines, make_t5  # noqa: E402
from import_mutations import copy_pipelines, edit_json, error_lines, judge, random_mutation  # noqa: E402

from imagen.cli.main import main  # noqa: E402

UNET = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny IF pipelines (``if-i``, ``if-ii``) and a T5 16 wide for the width case."""
    root = tmp_path_factory.mktemp("if36")
    make_if_pipelines(root)
    encoder, tokenizer = make_t5(root / "t5-16", d_model=16)
    encoder.save_pretrained(root / "narrow" / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(root / "narrow" / "tokenizer")
    return root


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEN_CACHE_DIR", str(tmp_path / "cache"))


# ---- named mutations of (base, sr) ---------------------------------------------------------
def unet(field, value, part="base"):
    def edit(base, sr):
        folder = base if part == "base" else sr
        edit_json(folder / "unet" / "config.json", lambda c: c.__setitem__(field, value))

    return edit


def weights(change):
    def edit(base, sr):
        path = base / "unet" / UNET
        path.write_bytes(change(path.read_bytes()))

    return edit


def header_claim(data):
    n = struct.unpack("<Q", data[:8])[0]
    head = json.loads(data[8 : 8 + n])
    key = next(k for k in head if k != "__metadata__")
    head[key]["shape"] = [2**31, 2**31]
    text = json.dumps(head).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def symlink_weights(base, sr):
    (base / "unet" / UNET).unlink()
    (base / "unet" / UNET).symlink_to("/etc/passwd")


def fifo_weights(base, sr):
    (base / "unet" / UNET).unlink()
    os.mkfifo(base / "unet" / UNET)


class Planted:
    """A pickle that, if it were ever loaded, would leave a file behind."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_encoder(base, sr):
    Planted.marker = str(base.parent / "PICKLE-WAS-LOADED")
    (base / "text_encoder" / "model.safetensors").unlink()
    (base / "text_encoder" / "pytorch_model.bin").write_bytes(pickle.dumps(Planted()))


def pickle_unet(base, sr):
    (base / "unet" / UNET).rename(base / "unet" / "diffusion_pytorch_model.bin")


def deep(relative, part="base"):
    def edit(base, sr):
        ((base if part == "base" else sr) / relative).write_text("[" * 100_000 + "]" * 100_000)

    return edit


def huge_config(base, sr):
    with open(base / "unet" / "config.json", "wb") as f:
        f.truncate(100 << 20)  # sparse: 100 MB claimed, nothing to read


def empty_tokenizer(base, sr):
    shutil.rmtree(base / "tokenizer")
    (base / "tokenizer").mkdir()


def foreign_vocabulary(base, sr):
    """A tokenizer whose pieces share nothing with English: every word is unknown."""

    def change(tok):
        vocab = tok["model"]["vocab"]
        specials = {t["content"] for t in tok.get("added_tokens", [])}
        for i, entry in enumerate(vocab):
            if entry[0] not in specials:
                entry[0] = f"#{i}"

    edit_json(base / "tokenizer" / "tokenizer.json", change)


def scheduler(field, value):
    """Set a field of the base's scheduler config (None: leave it out, as diffusers may)."""

    def edit(base, sr):
        path = base / "scheduler" / "scheduler_config.json"
        change = (
            (lambda c: c.pop(field)) if value is None else (lambda c: c.__setitem__(field, value))
        )
        edit_json(path, change)

    return edit


def t5_config(field, value):
    def edit(base, sr):
        edit_json(base / "text_encoder" / "config.json", lambda c: c.__setitem__(field, value))

    return edit


CASES = [
    # absurd sizes: refused from the config, before anything is built
    ("width-1e6", unet("block_out_channels", [16, 1_000_000]), "block_out_channels must be an"),
    ("layers-1e5", unet("layers_per_block", 100_000), "layers_per_block must be an integer in"),
    ("groups-0", unet("norm_num_groups", 0), "norm_num_groups must be an integer in [1, 16384]"),
    ("hid-1e8", unet("encoder_hid_dim", 1e8), "encoder_hid_dim must be an integer"),
    ("sr-levels", unet("down_block_types", ["ResnetDownsampleBlock2D"] * 9, "sr"), "1 to 8"),
    ("unknown-field", unet("not_a_field", 1), "unknown field(s) not_a_field"),
    ("bad-block", unet("mid_block_type", "NoSuchBlock"), "does not describe a U-Net that can"),
    ("groups-7", unet("norm_num_groups", 7), "a multiple of norm_num_groups (7)"),
    ("t5-layers", t5_config("num_layers", 10**6), "num_layers must be an integer in [1, 128]"),
    ("t5-type", t5_config("model_type", "bert"), "model_type 'bert' is not a T5 encoder"),
    ("thresholding", scheduler("thresholding", "yes"), "thresholding must be true or false"),
    ("no-beta-schedule", scheduler("beta_schedule", None), "beta_schedule is 'linear'"),
    ("trained-betas", scheduler("trained_betas", [0.1] * 4), "trained_betas replace the schedule"),
    # weights that do not fit the config, or are not safetensors at all
    ("wider-config", unet("block_out_channels", [16, 64]), "does not fit the network of its"),
    ("truncated", weights(lambda d: d[: len(d) // 2]), "is not a readable safetensors file"),
    ("zero-bytes", weights(lambda d: b""), "not a readable safetensors file (header cut short"),
    ("claim-2^62", weights(header_claim), "is not a readable safetensors file"),
    (
        "header-2^60",
        weights(lambda d: struct.pack("<Q", 1 << 60) + d[8:]),
        "(header too large",
    ),
    ("passwd", symlink_weights, "leads outside the pipeline folder"),
    ("fifo", fifo_weights, "is not a regular file"),
    ("pickle-t5", pickle_encoder, "weights only as a pickle (pytorch_model.bin), which imagen"),
    ("pickle-unet", pickle_unet, "weights only as a pickle (diffusion_pytorch_model.bin)"),
    # configs nested 100,000 deep, or 100 MB
    ("deep-unet", deep("unet/config.json"), "nested more than 32 levels deep"),
    ("deep-scheduler", deep("scheduler/scheduler_config.json"), "nested more than 32"),
    ("deep-t5", deep("text_encoder/config.json"), "nested more than 32 levels deep"),
    ("deep-index", deep("model_index.json"), "nested more than 32 levels deep"),
    ("deep-sr-noise", deep("image_noising_scheduler/scheduler_config.json", "sr"), "nested"),
    ("huge-config", huge_config, "100.0 MiB is too large for a config.json"),
    # a tokenizer that would map every prompt to <unk>
    ("empty-tokenizer", empty_tokenizer, "holds no tokenizer (tokenizer.json or spiece.model)"),
    ("foreign-vocabulary", foreign_vocabulary, "to unknown tokens only"),
]


@pytest.mark.parametrize(("name", "mutate", "message"), CASES, ids=[c[0] for c in CASES])
def test_a_hostile_pipeline_is_refused_with_one_line(tiny, tmp_path, capsys, name, mutate, message):
    base, sr = copy_pipelines(tiny, tmp_path / "src")
    mutate(base, sr)
    out = tmp_path / "work" / "model"
    out.parent.mkdir()
    for extra in ([], ["--copy"]) if name == "passwd" else ([],):
        code = main(["import", str(base), str(sr), "--out", str(out), *extra])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err and len(error_lines(err)) == 1, err
        assert message in err, err
        assert list(out.parent.iterdir()) == []  # nothing written, no staging left
    assert not (tmp_path / "src" / "PICKLE-WAS-LOADED").exists()


def test_a_pickle_beside_safetensors_is_never_opened(tiny, tmp_path, capsys):
    base, sr = copy_pipelines(tiny, tmp_path / "src")
    Planted.marker = str(tmp_path / "PICKLE-WAS-LOADED")
    (base / "text_encoder" / "pytorch_model.bin").write_bytes(pickle.dumps(Planted()))
    assert main(["import", str(base), str(sr), "--out", str(tmp_path / "m")]) == 0
    argv = ["sample", "a red cat", "--model", str(tmp_path / "m"), "--steps", "1"]
    assert main([*argv, "--out", str(tmp_path / "s")]) == 0, capsys.readouterr().err
    assert not Path(Planted.marker).exists()


def test_a_text_encoder_of_another_width_is_refused_before_it_loads(tiny, tmp_path, capsys):
    argv = ["import", str(tiny / "if-i"), "--text-encoder", str(tiny / "narrow")]
    assert main([*argv, "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "the text encoder is 16 wide, but the U-Net of" in err and "takes text 32 wide" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m").exists()


def test_a_hub_snapshot_may_link_into_its_blobs_and_nowhere_else(tiny, tmp_path, monkeypatch):
    """The Hub keeps a snapshot's files as symlinks into the repo's blobs/: those import."""
    repo = tmp_path / "hub" / "models--tiny--if-i"
    snap = repo / "snapshots" / ("ab" * 20)
    (repo / "blobs").mkdir(parents=True)
    for f in sorted((tiny / "if-i").rglob("*")):
        rel = f.relative_to(tiny / "if-i")
        if f.is_dir():
            (snap / rel).mkdir(parents=True, exist_ok=True)
            continue
        blob = repo / "blobs" / str(rel).replace("/", "-")
        shutil.copyfile(f, blob)
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).symlink_to(os.path.relpath(blob, (snap / rel).parent))
    assert main(["import", str(snap), "--out", str(tmp_path / "m")]) == 0
    (snap / "unet" / UNET).unlink()
    (snap / "unet" / UNET).symlink_to("/etc/passwd")
    assert main(["import", str(snap), "--out", str(tmp_path / "n")]) == 2


# ---- --out: no user file lost ----------------------------------------------------------------
def imported(tiny, out, *extra):
    return main(["import", str(tiny / "if-i"), str(tiny / "if-ii"), "--out", str(out), *extra])


def test_out_holding_a_pipeline_or_a_stray_index_is_refused(tiny, tmp_path, capsys):
    assert imported(tiny, tmp_path / "m") == 0
    capsys.readouterr()
    theirs = Path(shutil.copytree(tiny / "if-i", tmp_path / "theirs"))  # a diffusers folder
    before = {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()}
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "model_index.json").write_text('{"my": "notes"}')
    for out in (theirs, stray):
        for extra in ([], ["--overwrite"]):
            assert imported(tiny, out, *extra) == 2
            err = capsys.readouterr().err
            assert "is not an imagen model index" in err and len(err.splitlines()) == 1, err
    assert {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()} == before
    assert (stray / "model_index.json").read_text() == '{"my": "notes"}'
    argv = ["export", str(tmp_path / "m" / "stage0"), "--out", str(stray)]
    assert main(argv) == 2 and "is not an imagen model index" in capsys.readouterr().err


def test_overwrite_replaces_an_earlier_model_and_keeps_the_users_files(tiny, tmp_path, capsys):
    out = tmp_path / "m"
    assert imported(tiny, out) == 0
    assert imported(tiny, out) == 0  # a model and nothing else: replaced, as before
    (out / "notes.txt").write_text("mine")
    (out / "stage0" / "mine.txt").write_text("also mine")
    capsys.readouterr()
    assert imported(tiny, out) == 2
    err = capsys.readouterr().err
    assert "not part of the model (notes.txt, stage0/mine.txt)" in err and "--overwrite" in err
    assert imported(tiny, out, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "stage0" / "mine.txt").read_text() == "also mine"
    assert main(["verify", str(out)]) == 0
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "keep.txt").write_text("mine")
    assert imported(tiny, plain) == 2 and "not a model directory" in capsys.readouterr().err
    assert imported(tiny, plain, "--overwrite") == 0 and (plain / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in plain.iterdir()) == [
        "keep.txt",
        "model_index.json",
        "stage0",
        "stage1",
    ]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_out_is_checked_before_anything_is_read(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    argv = ["import", str(tmp_path / "no-such-pipeline"), "--out", str(tmp_path / "a-file")]
    assert main(argv) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_staging_of_dead_imports_is_removed_and_sigterm_leaves_none(
    tiny, tmp_path, capsys, monkeypatch
):
    work = tmp_path / "work"
    dead = work / ".m.tmp-999999999"  # an import killed outright (SIGKILL)
    (dead / "stage0").mkdir(parents=True)
    (dead / "stage0" / "model.safetensors").write_bytes(b"x" * 1000)
    (dead / "model_index.json").write_text("{}")
    other = work / ".notes.tmp-999999999"  # not a model's: never touched
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert imported(tiny, work / "m") == 0
    assert sorted(p.name for p in work.iterdir()) == [".notes.tmp-999999999", "m"]
    from imagen.models import model_dir

    real = model_dir._link_or_copy

    def link_then_terminated(*args):
        real(*args)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(model_dir, "_link_or_copy", link_then_terminated)
    with pytest.raises(SystemExit) as e:
        imported(tiny, work / "n")
    assert e.value.code == 128 + signal.SIGTERM
    assert "Traceback" not in capsys.readouterr().err
    assert sorted(p.name for p in work.iterdir()) == [".notes.tmp-999999999", "m"]


# ---- the fuzz -------------------------------------------------------------------------------
FUZZ = 24  # mutants here (a fifth of a second each); benchmarks/import_fuzz.py runs 300


def test_random_mutations_are_refused_with_one_line_or_import_and_sample(tiny, tmp_path):
    failures, outcomes = [], []
    for i in range(FUZZ):
        rng = random.Random(3600 + i)
        base, sr = copy_pipelines(tiny, tmp_path / f"m{i}")
        what = random_mutation(rng, base, sr)
        work = tmp_path / f"w{i}"
        work.mkdir()
        result = judge(base, sr, work)
        outcomes.append(result["outcome"])
        if result["outcome"] not in ("refused", "imported and sampled"):
            failures.append((what, result))
        shutil.rmtree(tmp_path / f"m{i}")
        shutil.rmtree(work)
    assert not failures, failures
    assert "refused" in outcomes and "imported and sampled" in outcomes


def test_the_unet_range_table_knows_every_argument_of_the_installed_diffusers(tiny):
    """A field the table lacks would be refused as unknown: a new diffusers shows here."""
    import inspect

    from diffusers import UNet2DConditionModel

    from imagen.models.config_ranges import UNET_2D_CONDITION, check_unet_2d_condition

    params = set(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}
    assert params == set(UNET_2D_CONDITION)
    for part in ("if-i", "if-ii"):  # the published layout passes
        path = tiny / part / "unet" / "config.json"
        check_unet_2d_condition(json.loads(path.read_text()), str(path))


def test_an_imported_model_edited_afterwards_is_refused_when_it_loads(tiny, tmp_path, capsys):
    """The ranges hold wherever a diffusers-unet config is read, not only at import."""
    from test_cli_errors import reseal

    out = tmp_path / "m"
    assert imported(tiny, out) == 0
    edit_json(
        out / "stage0" / "config.json",
        lambda c: c["unet"]["config"].update(layers_per_block=100_000),
    )
    reseal(out)
    capsys.readouterr()
    argv = ["sample", "a red cat", "--model", str(out), "--steps", "1"]
    assert main([*argv, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "layers_per_block must be an integer in [1, 16]" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "s").exists()
