"""WebDataset shards, the way LAION is consumed (img2dataset's ``webdataset`` output): tar
files holding ``jpg``/``png``/``webp`` + ``txt`` (+ ``json``) per sample, from local paths,
URLs or ``pipe:`` commands, streamed with a shuffle buffer.

Shards are dealt round-robin to processes (rank r of W takes shards r, r + W, ...) and then
to data-loader workers, so no sample is read twice in an epoch; that needs at least
W x workers shards. Bad samples are skipped and counted (the counts ride along with the next
good sample, so they reach the trainer from worker processes too).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from imagen.data.folders import Preprocess, Sample, load_image_record

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def expand_shards(spec: str | list[str]) -> list[str]:
    """Brace-expand a shard pattern ("data/{00000..00099}.tar"), or a list of them; a
    directory means every .tar in it."""
    import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for s in specs:
        p = Path(s)
        if p.is_dir():
            out += sorted(str(x) for x in p.glob("*.tar"))
        else:
            for part in s.split("::"):
                out += list(braceexpand.braceexpand(part))
    if not out:
        raise ValueError(f"no shards match {spec!r}")
    return out


class WebDatasetSource(IterableDataset):
    """An iterable of :data:`Sample` (image in [-1, 1] at ``size``, caption, notes) from shards."""

    def __init__(
        self,
        shards: str | list[str],
        size: int,
        rank: int = 0,
        world: int = 1,
        shuffle_buffer: int = 1000,
        random_crop: bool = True,
        min_size: int = 0,
        seed: int = 0,
        epoch: int = 0,
        resize_to: int = 0,
        hflip: bool = False,
    ) -> None:
        self.urls = expand_shards(shards)
        self.rank, self.world, self.shuffle_buffer = rank, world, shuffle_buffer
        self.prep = Preprocess(size, resize_to, min_size, random_crop, hflip)
        self.seed, self.epoch = seed, epoch

    def _split(self, urls: list[str]) -> list[str]:
        mine = urls[self.rank :: self.world]
        info = get_worker_info()
        if info is not None:
            mine = mine[info.id :: info.num_workers]
        return mine

    def __iter__(self) -> Iterator[Sample]:
        import webdataset as wds

        info = get_worker_info()
        worker = info.id if info is not None else 0
        pipeline = wds.WebDataset(
            self._split(self.urls),
            nodesplitter=None,
            workersplitter=None,
            shardshuffle=False,
            empty_check=False,
        )
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        pending: list[str] = []
        stream = self._decode(pipeline, rng, pending)
        if self.shuffle_buffer > 1:
            stream = _shuffled(stream, self.shuffle_buffer, rng)
        yield from stream
        if pending:  # skipped samples after the last good one still get counted
            yield torch.empty(0), "", tuple(pending)

    def _decode(
        self, pipeline: object, rng: np.random.Generator, pending: list[str]
    ) -> Iterator[Sample]:
        for sample in pipeline:
            key = next((k for k in IMAGE_KEYS if k in sample), None)
            if key is None:
                pending.append("no image in sample")
                continue
            raw = sample.get("txt")
            if raw is None:
                pending.append("missing caption")
                continue
            try:
                caption = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                pending.append("undecodable caption")
                continue
            image, notes = load_image_record(
                sample[key], self.prep, rng if self.prep.random else None
            )
            pending += notes
            if image is None:
                continue
            out = (image, caption, tuple(pending))
            pending.clear()
            yield out


def _shuffled(stream: Iterator[Sample], size: int, rng: np.random.Generator) -> Iterator[Sample]:
    """A shuffle buffer: keep ``size`` samples, yield a random one as each new one arrives."""
    buf: list[Sample] = []
    for item in stream:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.integers(len(buf)))
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)  # type: ignore[arg-type]
    yield from buf


def shard_captions(shards: str | list[str]) -> list[str]:
    """Every caption in the shards (for the embedding cache); reads only the ``txt`` members."""
    import tarfile

    out = []
    for url in expand_shards(shards):
        with tarfile.open(url) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".txt"):
                    f = tar.extractfile(member)
                    if f is not None:
                        out.append(f.read().decode("utf-8", errors="replace").strip())
    return out
