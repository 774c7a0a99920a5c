"""Output directories: checked before any work starts, and written atomically.

:class:`StagedOutput` writes a run's files into a hidden staging directory beside the target
and moves them into place only when the run succeeded (the manifest last), so an output
directory never holds half a run: after a failure (a full disk, an interrupt) the staging
directory is removed and the target is as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from imagen.cli.common import UsageError


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as an absolute path, or a UsageError unless it is (or can be made as) a
    writable directory: not a file, not under a file, its nearest existing directory
    writable (tried by making and removing an empty directory there)."""
    target = Path(os.path.abspath(Path(path).expanduser()))
    if target.exists() and not target.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a directory")
    try:  # a real probe: permissions, read-only and special file systems all show here
        os.rmdir(tempfile.mkdtemp(prefix=".imagen-probe-", dir=existing))
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {existing} ({e.strerror})") from None
    return target


class StagedOutput:
    """A run's output directory, written atomically (see the module docstring).

    Use as a context manager: files go to :meth:`path`; :meth:`commit` moves them into the
    target (renaming the staging directory when the target does not exist yet, else moving
    file by file with the names in ``last`` at the end); leaving the block without a commit
    removes everything staged."""

    def __init__(self, target: str | Path, flag: str = "--out") -> None:
        self.target = check_output_dir(target, flag)
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.staging = Path(
                tempfile.mkdtemp(
                    prefix=f".{self.target.name}.", suffix=".partial", dir=self.target.parent
                )
            )
        except OSError as e:
            raise UsageError(f"{flag} {target}: cannot write there ({e.strerror})") from None
        self.committed = False

    def path(self, name: str) -> Path:
        """Where to write the output file ``name`` during the run."""
        return self.staging / name

    def commit(self, last: tuple[str, ...] = ("manifest.jsonl",)) -> Path:
        """Move the staged files into the target directory; returns the target."""
        if not self.target.exists():
            os.replace(self.staging, self.target)
        else:
            names = sorted(p.name for p in self.staging.iterdir())
            for name in [n for n in names if n not in last] + [n for n in last if n in names]:
                os.replace(self.staging / name, self.target / name)
            self.staging.rmdir()
        self.committed = True
        return self.target

    def discard(self) -> None:
        """Remove everything staged."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if not self.committed:
            self.discard()
