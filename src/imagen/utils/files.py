"""Durable small files: JSON records written so that a crash leaves either the old file or the
new one, never half of one (model indexes, checkpoint records, run options and summaries)."""

from __future__ import annotations

import json
import os
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
