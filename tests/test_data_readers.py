import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from imagen.data.folders import ImageTextFolder
from imagen.data.webdataset import WebDatasetSource, shard_captions
from imagen.models.lowres import resize
from imagen.training.data import StepBatchSampler, collate
from imagen.training.parallel import Dist


def png_bytes(img, fmt="PNG"):
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def good_image(i, size=40, mode="RGB"):
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).convert(mode)


def make_folder(root):
    root.mkdir()
    for i in range(6):
        good_image(i).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"caption {i}\n")
    (root / "bad.png").write_bytes(b"not an image at all")
    (root / "bad.txt").write_text("corrupt")
    (root / "trunc.png").write_bytes(png_bytes(good_image(9))[:60])
    (root / "trunc.txt").write_text("truncated")
    good_image(10, mode="L").save(root / "gray.png")
    (root / "gray.txt").write_text("grayscale")
    good_image(11, mode="CMYK").save(root / "cmyk.jpg")
    (root / "cmyk.txt").write_text("cmyk")
    good_image(12).convert("P").save(root / "pal.png")
    (root / "pal.txt").write_text("palette")
    good_image(13, mode="RGBA").save(root / "alpha.png")
    (root / "alpha.txt").write_text("alpha")
    good_image(14, size=8).save(root / "tiny.png")
    (root / "tiny.txt").write_text("tiny")
    good_image(15).save(root / "nocap.png")
    return root


def test_folder_skips_and_counts_bad_records(tmp_path):
    ds = ImageTextFolder(make_folder(tmp_path / "f"), 32, min_size=16)
    assert ds.scan_skipped == Counter({"missing caption": 1})
    notes, captions = Counter(), []
    for i in range(len(ds)):
        img, cap, n = ds[i]
        assert img.shape == (3, 32, 32) and img.min() >= -1 and img.max() <= 1
        notes.update(n)
        captions.append(cap)
    # every read attempt is counted: a bad record is met again when a neighbour skips onto it
    assert notes["unreadable image"] >= 2 and notes["image too small"] == 1
    for mode in ("L", "CMYK", "P", "RGBA"):
        assert notes[f"converted {mode}"] >= 1
    assert "grayscale" in captions and "corrupt" not in captions


def test_folder_with_metadata_jsonl_and_csv(tmp_path):
    for kind in ("jsonl", "csv"):
        root = tmp_path / kind
        root.mkdir()
        for i in range(3):
            good_image(i).save(root / f"{i}.png")
        if kind == "jsonl":
            (root / "metadata.jsonl").write_text(
                "\n".join(json.dumps({"file_name": f"{i}.png", "text": f"t{i}"}) for i in range(2))
            )
        else:
            (root / "metadata.csv").write_text("file_name,caption\n0.png,t0\n1.png,t1\n")
        ds = ImageTextFolder(root, 16)
        assert ds.captions() == ["t0", "t1"] and ds.scan_skipped["missing caption"] == 1


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no captioned images"):
        ImageTextFolder(tmp_path, 16)
    with pytest.raises(FileNotFoundError):
        ImageTextFolder(tmp_path / "nope", 16)


def test_random_and_centre_crops(tmp_path):
    root = make_folder(tmp_path / "f")
    centre = ImageTextFolder(root, 32)
    rand = ImageTextFolder(root, 32, random_crop=True, seed=1)
    assert torch.equal(centre[0][0], centre[0][0])
    assert torch.equal(rand[0][0], rand[0][0])  # deterministic per (seed, index)
    assert any(not torch.equal(rand[i][0], centre[i][0]) for i in range(6))


def write_shards(root, n_shards=4, per_shard=5, corrupt=True):
    root.mkdir()
    names = []
    for s in range(n_shards):
        path = root / f"shard-{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                members = {
                    "jpg": png_bytes(good_image(s * 100 + i), "JPEG"),
                    "txt": f"sample {key}".encode(),
                    "json": b"{}",
                }
                if corrupt and i == 1:
                    members["jpg"] = b"garbage"
                if corrupt and i == 2:
                    del members["txt"]
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        names.append(str(path))
    return names


def read_all(ds, workers=0):
    caps, notes = [], Counter()
    for images, captions, n in DataLoader(
        ds, batch_size=3, num_workers=workers, collate_fn=collate
    ):
        caps += captions
        notes.update(n)
        assert images.shape[1:] == (3, 32, 32) or not captions
    return caps, notes


def test_webdataset_reads_counts_bad_samples_and_splits_over_workers(tmp_path):
    write_shards(tmp_path / "w")
    pattern = str(tmp_path / "w" / "shard-{00000..00003}.tar")
    caps, notes = read_all(WebDatasetSource(pattern, 32, shuffle_buffer=4))
    assert len(caps) == 12 == len(set(caps)) and notes == Counter(
        {"unreadable image": 4, "missing caption": 4}
    )
    caps2, notes2 = read_all(WebDatasetSource(pattern, 32, shuffle_buffer=4), workers=2)
    assert sorted(caps2) == sorted(caps) and notes2 == notes  # nothing read twice, nothing lost
    assert len(shard_captions(str(tmp_path / "w"))) == 16


def test_webdataset_two_processes_split_without_duplicates(tmp_path):
    write_shards(tmp_path / "w", corrupt=False)
    parts = [
        read_all(WebDatasetSource(str(tmp_path / "w"), 32, rank=r, world=2))[0] for r in range(2)
    ]
    assert not set(parts[0]) & set(parts[1]) and len(parts[0]) + len(parts[1]) == 20


def test_step_batches_split_over_processes_and_workers():
    one = [i for b in StepBatchSampler(4, 1, Dist(0, 1), 0, 5) for i in b]
    two = [i for r in range(2) for b in StepBatchSampler(2, 1, Dist(r, 2), 0, 5) for i in b]
    assert sorted(one) == sorted(two) == list(range(20))
    accum = [i for r in range(2) for b in StepBatchSampler(1, 2, Dist(r, 2), 0, 5) for i in b]
    assert sorted(accum) == list(range(20))
    resumed = [i for b in StepBatchSampler(4, 1, Dist(0, 1), 2, 5) for i in b]
    assert resumed == one[8:]

    class Echo(torch.utils.data.Dataset):
        def __getitem__(self, i):
            return torch.full((1,), float(i)), str(i), ()

    loader = DataLoader(
        Echo(),
        batch_sampler=StepBatchSampler(4, 1, Dist(0, 1), 0, 5),
        num_workers=2,
        collate_fn=collate,
    )
    seen = [c for _, caps, _ in loader for c in caps]
    assert seen == [str(i) for i in range(20)]


def test_super_resolution_pair_is_the_downsampled_image():
    hr = torch.rand(2, 3, 64, 64) * 2 - 1
    lr = resize(hr, 16)
    want = hr.reshape(2, 3, 16, 4, 16, 4).mean(dim=(3, 5))  # 4x4 box average
    assert torch.allclose(lr, want, atol=1e-6)


def test_crops_from_larger_resizes_and_optional_flips(tmp_path):
    root = tmp_path / "f"
    root.mkdir()
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    img[:, :32] = 255  # left half white
    Image.fromarray(img).save(root / "a.png")
    (root / "a.txt").write_text("white on the left")
    whole = ImageTextFolder(root, 16)[0][0]  # the whole image, resized
    assert whole[:, :, :8].mean() > 0.9 and whole[:, :, 8:].mean() < -0.9
    crops = [
        ImageTextFolder(root, 16, random_crop=True, resize_to=64, seed=s)[0][0] for s in range(8)
    ]
    assert all(c.shape == (3, 16, 16) for c in crops)
    assert len({round(c.mean().item(), 3) for c in crops}) > 2  # crops of the full-size image
    never = [ImageTextFolder(root, 16, seed=s)[0][0] for s in range(6)]
    assert all(torch.equal(n, whole) for n in never)  # flips are off by default
    flipped = [ImageTextFolder(root, 16, hflip=True, seed=s)[0][0] for s in range(12)]
    assert any(f[:, :, :8].mean() < -0.9 for f in flipped) and any(
        f[:, :, :8].mean() > 0.9 for f in flipped
    )
