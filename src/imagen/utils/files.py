"""Durable small files: JSON records written so that a crash leaves either the old file or the
new one, never half of one (model indexes, checkpoint records, run options and summaries)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any, atomic: bool = True) -> None:
    """Write ``data`` as indented JSON to ``path``, flushed and fsynced; ``atomic`` writes it
    under a temporary name first and renames it into place (False: for files inside a
    directory that is itself renamed into place once complete)."""
    target = path.with_name(f".{path.name}.tmp-{os.getpid()}") if atomic else path
    with open(target, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    if atomic:
        os.replace(target, path)


@contextmanager
def replacing_directory(root: Path, earlier: bool, what: str) -> Iterator[Path]:
    """A fresh path beside ``root`` to write a directory into (not yet created); when the block
    ends without an error it replaces ``root``, else it is removed. ``root`` may be replaced
    only when it is missing, empty or ``earlier`` (an earlier ``what``)."""
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not earlier)):
        raise FileExistsError(f"refusing to replace {root}: it is not an earlier {what}")
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if root.exists():
            shutil.rmtree(root)
        os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (after a rename) to disk where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
