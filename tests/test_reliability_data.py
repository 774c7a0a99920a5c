"""Bad training data, built on the fly: decompression bombs, huge images, 16-bit and other
modes, captions that are not UTF-8, truncated and unreadable shards; and the source registry."""

import io
import json
import struct
import tarfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_readers import good_image, png_bytes, read_all
from test_training import config

from imagen.data import sources
from imagen.data.config import DataConfig
from imagen.data.folders import ImageTextFolder
from imagen.data.images import Preprocess, decode_image, load_image_record, to_rgb
from imagen.data.sources import SourceKind, get_source
from imagen.data.webdataset import BAD_SHARD, WebDatasetSource, shard_captions
from imagen.training.data import dataset_captions
from imagen.training.trainer import train_stage
from imagen.utils.pil import pil_to_tensor


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with a tiny IDAT: a bomb
    when large (a few hundred bytes that would decode to gigabytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def ramp16_png() -> bytes:
    """A 16-bit grayscale PNG holding a 0..65535 ramp."""
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    img = Image.fromarray(ramp)
    assert img.mode == "I;16"
    return png_bytes(img)


# ---- decoding ------------------------------------------------------------------------------
def test_a_bomb_is_refused_from_its_header_without_decoding(monkeypatch):
    def no_decoding(self):
        raise AssertionError("the bomb was decoded")

    for w, h in ((30000, 30000), (13000, 13000)):  # Pillow refuses the first, decodes the second
        data = png_claiming(w, h)
        assert len(data) < 1000
        with monkeypatch.context() as m:
            m.setattr(Image.Image, "load", no_decoding)
            m.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
            t0 = time.perf_counter()
            img, notes = decode_image(data, Preprocess(32))
            assert time.perf_counter() - t0 < 1.0
        assert img is None and notes == ["image too large"]
    # the limit is the configured pixel count
    small = png_bytes(good_image(0, size=100))
    assert decode_image(small, Preprocess(32, max_pixels=100 * 108 - 1))[1] == ["image too large"]
    assert decode_image(small, Preprocess(32, max_pixels=100 * 108))[0] is not None


def test_sixteen_bit_images_keep_their_range():
    image, notes = load_image_record(ramp16_png(), Preprocess(64), None)
    assert notes == ["converted I;16"]
    # a 0..65535 ramp is mid-grey on average, not white (Pillow's own conversion clips it)
    assert abs(image.mean().item()) < 0.01 and image.min() == -1 and image.max() == 1
    ramp = np.linspace(0, 65535, 4096).reshape(64, 64)
    for img in (
        Image.fromarray(ramp.astype(np.int32)),  # mode I
        Image.fromarray((ramp / 65535).astype(np.float32)),  # mode F in [0, 1]
        Image.fromarray((ramp / 257).astype(np.float32)),  # mode F in [0, 255]
    ):
        rgb, note = to_rgb(img)
        assert rgb.mode == "RGB" and note == f"converted {img.mode}"
        assert abs(pil_to_tensor(rgb).mean().item()) < 0.01


def test_transparency_and_other_modes_become_rgb():
    white = (255, 255, 255)
    la = Image.new("LA", (4, 4), (0, 0))  # fully transparent black
    assert to_rgb(la)[0].getpixel((0, 0)) == white
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 1  # palette index 1 is transparent
    reopened = Image.open(io.BytesIO(png_bytes(pal)))
    assert reopened.mode == "P" and to_rgb(reopened)[0].getpixel((0, 0)) == white
    cmyk, note = to_rgb(Image.new("CMYK", (4, 4), (0, 255, 255, 0)))
    assert cmyk.getpixel((0, 0)) == (255, 0, 0) and note == "converted CMYK"
    for mode in ("1", "L", "I;16B", "YCbCr", "RGBA", "PA", "LAB", "HSV"):
        assert to_rgb(Image.new(mode, (4, 4)))[0].mode == "RGB"


# ---- captions ------------------------------------------------------------------------------
def test_captions_that_are_not_utf8_are_skipped_and_counted(tmp_path):
    root = tmp_path / "txt"
    root.mkdir()
    for i in range(3):
        good_image(i).save(root / f"{i}.png")
    (root / "0.txt").write_text("fine")
    (root / "1.txt").write_bytes(b"caf\xe9 latin-1")
    (root / "2.txt").write_bytes(b"\xef\xbb\xbfwith a byte-order mark\n")
    ds = ImageTextFolder(root, 16)
    assert ds.captions() == ["fine", "with a byte-order mark"]
    assert ds.scan_skipped == Counter({"caption not UTF-8": 1})
    for kind, body in (
        ("jsonl", b'{"file_name": "0.png", "text": "ok"}\n{"file_name": "1.png", "text": "\xff"}'),
        ("csv", b"file_name,text\n0.png,ok\n1.png,caf\xe9\n"),
    ):
        meta = tmp_path / kind
        meta.mkdir()
        for i in range(3):
            good_image(i).save(meta / f"{i}.png")
        (meta / f"metadata.{kind}").write_bytes(body)
        ds = ImageTextFolder(meta, 16)
        assert ds.captions() == ["ok"]
        assert ds.scan_skipped == Counter({"caption not UTF-8": 1, "missing caption": 1})


# ---- shards --------------------------------------------------------------------------------
def tar_bytes(samples: list[dict[str, bytes]], first_key: int = 0) -> tuple[bytes, list[int]]:
    """A tar of samples (extension -> bytes) and the data offset of each member."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for k, sample in enumerate(samples, first_key):
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"{k:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        offsets = [m.offset_data for m in tar.getmembers()]
    return raw, offsets


def sample(i: int, **override: bytes) -> dict[str, bytes]:
    out = {"jpg": png_bytes(good_image(i), "JPEG"), "txt": f"sample {i}".encode()}
    out.update(override)
    return {k: v for k, v in out.items() if v}


def bad_shards(root: Path) -> Path:
    """Shards holding every kind of bad record, a truncated shard and one that is no tar."""
    root.mkdir()
    records = [
        sample(0),
        sample(1, png=png_claiming(30000, 30000), jpg=b""),  # a decompression bomb
        sample(2, png=png_claiming(13000, 13000), jpg=b""),  # legal to Pillow, 1 GB decoded
        sample(3, png=ramp16_png(), jpg=b""),  # 16-bit
        sample(4, txt=b"caf\xe9"),  # caption not UTF-8
        sample(5, jpg=b"garbage"),  # unreadable image
        sample(6, txt=b""),  # missing caption
        sample(7, jpg=b"", json=b"{}"),  # no image
        sample(8),
        sample(9),
    ]
    (root / "a-00000.tar").write_bytes(tar_bytes(records)[0])
    good = [sample(i) for i in range(10, 16)]
    raw, offsets = tar_bytes(good, first_key=10)
    (root / "b-00001.tar").write_bytes(raw[: offsets[7] + 100])  # cut inside sample 13's image
    (root / "c-00002.tar").write_bytes(b"this is not a tar file" * 40)
    (root / "d-00003.tar").write_bytes(tar_bytes([sample(i) for i in range(20, 24)], 20)[0])
    return root


EXPECTED_SHARD_NOTES = {
    "image too large": 2,
    "converted I;16": 1,
    "caption not UTF-8": 1,
    "unreadable image": 1,
    "missing caption": 1,
    "no image in sample": 1,
    BAD_SHARD: 2,
}


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_and_unreadable_shards_are_skipped_and_counted(tmp_path, workers):
    root = bad_shards(tmp_path / "w")
    caps, notes = read_all(WebDatasetSource(str(root), 32, shuffle_buffer=3), workers)
    kept = {c for c in caps}
    # before the cut: samples 10..12 (13's image is cut off); the shard after it is read
    assert {f"sample {i}" for i in (0, 3, 8, 9, 10, 11, 12, 20, 21, 22, 23)} == kept
    assert len(caps) == len(kept) and notes == Counter(EXPECTED_SHARD_NOTES)
    skipped = Counter()
    captions = shard_captions(str(root), skipped)
    assert "sample 4" not in captions and "sample 23" in captions
    assert skipped == Counter({"caption not UTF-8": 1, BAD_SHARD: 2})


def test_embed_reads_captions_past_bad_shards(tmp_path, capsys, caplog):
    from imagen.cli.main import main

    cfg = config(data=DataConfig(kind="webdataset", path=str(bad_shards(tmp_path / "w"))))
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert main(["embed", str(tmp_path / "c.json"), "--out", str(tmp_path / "emb")]) == 0
    assert "bytes/caption" in capsys.readouterr().out
    assert "captions left out" in caplog.text and BAD_SHARD in caplog.text


def test_a_missing_shard_is_counted_not_fatal(tmp_path):
    root = bad_shards(tmp_path / "w")
    shards = [str(root / "d-00003.tar"), str(root / "gone.tar")]  # a list, as YAML gives it
    data = DataConfig(kind="webdataset", path=shards)
    ds = get_source("webdataset").open(data, data.preprocess(32), sources.Split())
    caps, notes = read_all(ds)
    assert len(caps) == 4 and notes == Counter({BAD_SHARD: 1})
    assert len(dataset_captions(data)) == 4


# ---- training on all of it -------------------------------------------------------------
def bad_folder(root: Path) -> Path:
    root.mkdir()
    for i in range(4):
        good_image(i).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"good {i}")
    files = {
        "bomb.png": png_claiming(30000, 30000),
        "huge.png": png_claiming(13000, 13000),
        "deep.png": ramp16_png(),
        "latin1.png": png_bytes(good_image(7)),
        "broken.png": b"not an image",
        "nocaption.png": png_bytes(good_image(8)),
        "tiny.png": png_bytes(good_image(9, size=8)),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
        if name != "nocaption.png":
            (root / name).with_suffix(".txt").write_text(name)
    (root / "latin1.txt").write_bytes(b"caf\xe9")
    return root


def last_logged_notes(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return rows[-1]["data_skipped"]


@pytest.mark.parametrize("kind", ["folder", "webdataset"])
def test_training_on_bad_records_finishes_and_counts_each_reason(tmp_path, kind):
    if kind == "folder":
        path = bad_folder(tmp_path / "d")
        want = ("image too large", "converted I;16", "caption not UTF-8", "unreadable image")
        want += ("missing caption", "image too small")
    else:
        path = bad_shards(tmp_path / "d")
        want = tuple(EXPECTED_SHARD_NOTES)
    data = DataConfig(kind=kind, path=str(path), min_size=16, shuffle_buffer=2)
    summary = train_stage(config(steps=4, data=data), 0, tmp_path / "run", progress=False)
    assert summary["step"] == 4
    written = json.loads((tmp_path / "run" / "summary.json").read_text())["data_skipped"]
    logged = last_logged_notes(tmp_path / "run")
    for reason in want:
        assert summary["data_skipped"][reason] >= 1, reason
        assert written[reason] == summary["data_skipped"][reason]
        assert logged[reason] >= 1, reason
    if kind == "folder":  # the two bombs are refused every time they are met, never decoded
        assert summary["data_skipped"]["image too large"] >= 2


# ---- the source registry -----------------------------------------------------------------
def test_data_kind_is_checked_against_the_registry():
    with pytest.raises(ValueError, match="one of folder, shapes, webdataset; got 'imagefolder'"):
        DataConfig(kind="imagefolder", path="x")
    with pytest.raises(ValueError, match="needs data.path"):
        DataConfig(kind="folder")
    with pytest.raises(ValueError, match="max_pixels"):
        DataConfig(max_pixels=0)
    with pytest.raises(ValueError, match="unknown ShapesConfig field"):
        DataConfig(shapes={"colour": 1})
    assert get_source("webdataset").stream and not get_source("folder").stream
    prep = DataConfig(kind="folder", path="x", hflip=True, seed=3).preprocess(16, training=False)
    assert prep == Preprocess(16, seed=3)  # no random crops or flips outside training


class Solid(torch.utils.data.Dataset):
    """A tiny map-style source: one colour per index."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int):
        return torch.full((3, self.size, self.size), i / 5 - 0.5), f"shade {i}", ()

    def captions(self) -> list[str]:
        return [f"shade {i}" for i in range(5)]


def test_a_registered_source_trains_without_changes_to_training(tmp_path, monkeypatch):
    kind = SourceKind(
        "solid",
        open=lambda opts, prep, split: Solid(prep.size),
        captions=lambda opts: Solid(8).captions(),
        needs_path=False,
    )
    monkeypatch.setitem(sources._SOURCES, "solid", kind)
    data = DataConfig(kind="solid")
    assert dataset_captions(data) == [f"shade {i}" for i in range(5)]
    summary = train_stage(config(steps=2, data=data), 0, tmp_path / "run", progress=False)
    assert summary["step"] == 2 and summary["data_skipped"] == {}
    with pytest.raises(ValueError, match="already registered"):
        sources.register_source(kind)
