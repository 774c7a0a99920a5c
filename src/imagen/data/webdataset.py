"""WebDataset shards, the way LAION is consumed (img2dataset's ``webdataset`` output): tar
files holding ``jpg``/``png``/``webp`` + ``txt`` (+ ``json``) per sample, from local paths,
URLs or ``pipe:`` commands, streamed with a shuffle buffer. A ``pipe:CMD`` shard runs CMD in a
shell and reads the tar from its output: a config that names one runs that command, so it is
refused unless the config opts in with ``data.allow_pipe: true`` (:func:`check_pipe_shards`).

Shards are dealt round-robin to processes (rank r of W takes shards r, r + W, ...) and then
to data-loader workers, so no sample is read twice in an epoch; that needs at least
W x workers shards. Bad samples are skipped and counted (the counts ride along with the next
good sample, so they reach the trainer from worker processes too). A shard that cannot be
opened, or is truncated or corrupt part-way, is counted once and reading goes on with the
samples it gave so far and then the next shard.
"""

from __future__ import annotations

import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from imagen.data.folders import MISSING_CAPTION, NOT_UTF8, Sample, decode_caption
from imagen.data.images import Preprocess, load_image_record

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
BAD_SHARD = "unreadable or truncated shard"
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error)


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


def check_pipe_shards(spec: str | list[str], allowed: bool) -> None:
    """Raise unless ``spec`` names no ``pipe:`` shard (a shell command), or ``allowed``."""
    if allowed:
        return
    try:
        urls = expand_shards(spec)
    except ValueError:
        return  # no shards at all: reported where the data are opened
    pipes = [u for u in urls if u.lstrip().startswith("pipe:")]
    if pipes:
        raise ValueError(
            f"data.path {pipes[0]!r} is a pipe: shard, which runs a shell command; set "
            f"data.allow_pipe: true in the config if you mean to run it"
        )


def _open_tar(url: str) -> tuple[tarfile.TarFile, IO[bytes] | None]:
    """A local shard with random access (members not asked for are seeked over), anything else
    (URL, ``pipe:``) as a stream."""
    if Path(url).is_file():
        return tarfile.open(url), None
    from webdataset.gopen import gopen

    stream = gopen(url)
    return tarfile.open(fileobj=stream, mode="r|*"), stream


def _split_name(name: str) -> tuple[str, str]:
    """Sample key and extension of a member: "dir/000123.seg.png" -> ("dir/000123", "seg.png")."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _members(
    tar: tarfile.TarFile, exts: tuple[str, ...] | None
) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, bytes) of each regular member, in order (only ``exts`` when given)."""
    for member in tar:
        if not member.isfile():
            continue
        key, ext = _split_name(member.name)
        if exts is not None and ext not in exts:
            continue
        f = tar.extractfile(member)
        data = f.read() if f is not None else None
        tar.members = []  # read once, in order: do not keep every header of the shard
        if data is not None:
            yield key, ext, data


def tar_samples(
    url: str, skipped: Counter[str], exts: tuple[str, ...] | None = None
) -> Iterator[dict[str, Any]]:
    """The samples of one shard: dicts of extension -> bytes (and ``__key__``), members of one
    sample being consecutive. An unreadable or truncated shard ends early, counted once in
    ``skipped`` (the incomplete sample it was reading is dropped with it)."""
    try:
        tar, stream = _open_tar(url)
    except SHARD_ERRORS:
        skipped[BAD_SHARD] += 1
        return
    sample: dict[str, Any] = {}
    complete = False
    try:
        with tar:
            for key, ext, data in _members(tar, exts):
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                sample.setdefault("__key__", key)
                if ext in sample:
                    skipped["duplicate member in sample"] += 1
                sample[ext] = data
        complete = True
    except SHARD_ERRORS:
        skipped[BAD_SHARD] += 1
    finally:
        if stream is not None:
            try:
                stream.close()  # a pipe: reports its command's failure here
            except SHARD_ERRORS:
                if complete:
                    skipped[BAD_SHARD] += 1
                complete = False
    if complete and sample:
        yield sample


class WebDatasetSource(IterableDataset):
    """An iterable of :data:`Sample` (image in [-1, 1] at ``prep.size``, caption, notes) from
    shards; ``prep`` as for :class:`~imagen.data.folders.ImageTextFolder`."""

    def __init__(
        self,
        shards: str | list[str],
        prep: Preprocess | int,
        rank: int = 0,
        world: int = 1,
        shuffle_buffer: int = 1000,
        epoch: int = 0,
        **fields: Any,
    ) -> None:
        self.urls = expand_shards(shards)
        self.rank, self.world, self.shuffle_buffer = rank, world, shuffle_buffer
        fields.setdefault("random_crop", True)
        self.prep = prep if isinstance(prep, Preprocess) else Preprocess(prep, **fields)
        self.epoch = epoch

    def _split(self, urls: list[str]) -> list[str]:
        mine = urls[self.rank :: self.world]
        info = get_worker_info()
        if info is not None:
            mine = mine[info.id :: info.num_workers]
        return mine

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng([self.prep.seed, self.epoch, self.rank, worker])
        pending: Counter[str] = Counter()
        stream = self._decode(self._split(self.urls), rng, pending)
        if self.shuffle_buffer > 1:
            stream = _shuffled(stream, self.shuffle_buffer, rng)
        yield from stream
        if pending:  # skipped samples after the last good one still get counted
            yield torch.empty(0), "", tuple(pending.elements())

    def _decode(
        self, urls: list[str], rng: np.random.Generator, pending: Counter[str]
    ) -> Iterator[Sample]:
        for url in urls:
            for sample in tar_samples(url, pending):
                key = next((k for k in IMAGE_KEYS if k in sample), None)
                if key is None:
                    pending["no image in sample"] += 1
                    continue
                if "txt" not in sample:
                    pending[MISSING_CAPTION] += 1
                    continue
                caption = decode_caption(sample["txt"])
                if caption is None:
                    pending[NOT_UTF8] += 1
                    continue
                image, notes = load_image_record(
                    sample[key], self.prep, rng if self.prep.random else None
                )
                pending.update(notes)
                if image is None:
                    continue
                out = (image, caption, tuple(pending.elements()))
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


def shard_captions(shards: str | list[str], skipped: Counter[str] | None = None) -> list[str]:
    """Every caption in the shards (for the embedding cache); reads only the ``txt`` members
    of local shards. Captions that are not UTF-8 and unreadable shards are left out and
    counted in ``skipped``."""
    skipped = Counter() if skipped is None else skipped
    out = []
    for url in expand_shards(shards):
        for sample in tar_samples(url, skipped, exts=("txt",)):
            caption = decode_caption(sample["txt"])
            if caption is None:
                skipped[NOT_UTF8] += 1
            else:
                out.append(caption)
    return out
