"""Data sources by name: what ``data.kind`` in a config can be.

Each kind is registered once with how to open it and how to list its captions, so a new
source is one :func:`register_source` call and no edit of the training code. There are two
sorts: map-style sources are indexed by global sample number (an exactly resumable run sees
the same samples); streams are iterable datasets read in passes, split over processes and
workers by the source itself (WebDataset shards).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch.utils.data import Dataset

from imagen.data.folders import ImageTextFolder
from imagen.data.images import Preprocess
from imagen.data.shapes import ShapesConfig, ShapesDataset, shapes_dataset
from imagen.data.webdataset import WebDatasetSource, shard_captions

log = logging.getLogger(__name__)


class SourceOptions(Protocol):
    """The settings sources read (a :class:`~imagen.data.config.DataConfig`)."""

    path: str | list[str] | None
    shapes: ShapesConfig
    shuffle_buffer: int


@dataclass(frozen=True)
class Split:
    """Which part of a stream this reader takes: process ``rank`` of ``world``, in pass
    ``epoch`` (map-style sources ignore it: their sampler splits them)."""

    rank: int = 0
    world: int = 1
    epoch: int = 0


@dataclass(frozen=True)
class SourceKind:
    """How to open one kind of data source and list its captions."""

    name: str
    open: Callable[[SourceOptions, Preprocess, Split], Dataset]  # items: image, caption, notes
    captions: Callable[[SourceOptions], list[str]]  # every caption (for the embedding cache)
    stream: bool = False  # an iterable read in passes; else map-style, indexed by sample number
    bounded: bool = True  # map-style: index i reads item i % len; False: every index is a sample
    needs_path: bool = True  # data.path is required


_SOURCES: dict[str, SourceKind] = {}


def register_source(kind: SourceKind) -> None:
    """Make ``kind`` available as ``data.kind: NAME``."""
    if kind.name in _SOURCES:
        raise ValueError(f"data source {kind.name!r} is already registered")
    _SOURCES[kind.name] = kind


def source_kinds() -> list[str]:
    """The registered kind names, sorted."""
    return sorted(_SOURCES)


def get_source(name: str) -> SourceKind:
    """The registered kind ``name``, or a clear error naming the known ones."""
    kind = _SOURCES.get(name)
    if kind is None:
        raise ValueError(f"data.kind must be one of {', '.join(source_kinds())}; got {name!r}")
    return kind


# ---- the built-in sources ----------------------------------------------------------------
def _shapes_captions(opts: SourceOptions) -> list[str]:
    if opts.shapes.paraphrase > 0:
        raise ValueError(
            "data.shapes.paraphrase draws captions as it goes, too many to list and embed ahead"
        )
    return ShapesDataset(8, opts.shapes).captions()


def _shard_captions(opts: SourceOptions) -> list[str]:
    skipped: Counter[str] = Counter()
    captions = shard_captions(opts.path or [], skipped)
    if skipped:
        log.warning("captions left out of %s: %s", opts.path, dict(skipped))
    return captions


def _folder_captions(opts: SourceOptions) -> list[str]:
    folder = ImageTextFolder(str(opts.path), Preprocess(8))
    if folder.scan_skipped:
        log.warning("records left out of %s: %s", opts.path, dict(folder.scan_skipped))
    return folder.captions()


register_source(
    SourceKind(
        "shapes",
        open=lambda opts, prep, split: shapes_dataset(prep.size, opts.shapes),
        captions=_shapes_captions,
        bounded=False,
        needs_path=False,
    )
)
register_source(
    SourceKind(
        "folder",
        open=lambda opts, prep, split: ImageTextFolder(str(opts.path), prep),
        captions=_folder_captions,
    )
)
register_source(
    SourceKind(
        "webdataset",
        open=lambda opts, prep, split: WebDatasetSource(
            opts.path or [], prep, split.rank, split.world, opts.shuffle_buffer, split.epoch
        ),
        captions=_shard_captions,
        stream=True,
    )
)
