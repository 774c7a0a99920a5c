import gzip
import json
import struct

import numpy as np
import pytest
from PIL import Image

from imagen.data.folders import ImageTextFolder
from imagen.data.prepare import (
    EMOJI_FONT,
    FASHION_DIR,
    prepare_emoji,
    prepare_fashion_mnist,
    read_idx,
)


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_recipe_on_synthetic_idx_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5), ("t10k", 3)):
        write_idx(src / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    assert read_idx(src / "train-images-idx3-ubyte.gz").shape == (5, 28, 28)
    counts = prepare_fashion_mnist(tmp_path / "out", source=src)
    assert counts == {"train": 5, "test": 3}
    rows = [
        json.loads(line)
        for line in (tmp_path / "out" / "train" / "metadata.jsonl").read_text().splitlines()
    ]
    assert (
        rows[7 % 5]["text"] == "a photo of a pullover" and rows[0]["text"] == "a photo of a t-shirt"
    )
    ds = ImageTextFolder(tmp_path / "out" / "train", 32)  # the trainer's reader takes it as is
    img, caption, notes = ds[1]
    assert caption == "a photo of a trouser" and img.shape == (3, 32, 32) and notes == ()


def test_missing_packages_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        prepare_fashion_mnist(tmp_path / "o", source=tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        prepare_emoji(tmp_path / "o", font_path=tmp_path / "none.ttf")


@pytest.mark.skipif(
    not (FASHION_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist(tmp_path):
    assert prepare_fashion_mnist(tmp_path / "o", limit=20) == {"train": 20, "test": 20}
    assert len(read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")) == 10000


@pytest.mark.skipif(not EMOJI_FONT.is_file(), reason="fonts-noto-color-emoji not installed")
def test_real_emoji(tmp_path):
    counts = prepare_emoji(tmp_path / "o", size=64, limit=12)
    assert counts["images"] == 12
    rows = [
        json.loads(line) for line in (tmp_path / "o" / "metadata.jsonl").read_text().splitlines()
    ]
    img = np.asarray(Image.open(tmp_path / "o" / rows[0]["file_name"]))
    assert img.shape == (64, 64, 3) and img.std() > 10  # a real coloured glyph, not blank
    assert rows[0]["text"] == "cyclone"  # U+1F300
