"""Output directories: checked before any work starts, and written atomically (torch-free:
the command line checks ``--out`` before importing anything heavy).

:class:`StagedOutput` writes a run's files into a hidden staging directory beside the target
and moves them into place only when the run succeeded (the manifest last), so an output
directory never holds half a run: after a failure (a full disk, an interrupt) the staging
directory is removed and the target is as it was. SIGTERM (what ``timeout``, ``kill`` and job
schedulers send) ends a run like Ctrl-C does, so the staging directory is removed then too;
one left by a run that was killed outright (SIGKILL, a power cut) is removed by the next run
that writes beside it.

A command that names its own files (``run_files``) never overwrites an earlier run: an output
directory that holds one is refused up front unless ``--overwrite`` is given, and then the
earlier run's files (only those: its images, grid and manifest) are replaced as a whole, so
the manifest always lists exactly the images beside it. Other files there are never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType


class OutputError(ValueError):
    """An output path that cannot be used (reported to the user as one line, exit status 2)."""


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as an absolute path, or a UsageError unless it is (or can be made as) a
    writable directory: not a file, not under a file, its nearest existing directory
    writable (tried by making and removing an empty directory there)."""
    target = Path(os.path.abspath(Path(path).expanduser()))
    if target.exists() and not target.is_dir():
        raise OutputError(f"{flag} {path}: exists and is not a directory")
    existing = target
    while not existing.exists():
        if existing.is_symlink():  # a dangling link: writing there fails only at the end
            raise OutputError(
                f"{flag} {path}: {existing} is a symlink to {os.readlink(existing)}, "
                f"which does not exist"
            )
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{flag} {path}: {existing} is a file, not a directory")
    try:  # a real probe: permissions, read-only and special file systems all show here
        os.rmdir(tempfile.mkdtemp(prefix=".imagen-probe-", dir=existing))
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot write in {existing} ({e.strerror})") from None
    return target


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """While inside: SIGTERM unwinds the program as Ctrl-C does (every ``finally`` and
    ``__exit__`` runs, so staged files are removed), then exits with status 143. Only the main
    thread can take signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    got: list[int] = []

    def terminated(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup
        got.append(signum)
        raise SystemExit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if got:  # after the cleanup inside (progress bars too), so it is the last line
            print("imagen: terminated (SIGTERM); nothing was left half-written", file=sys.stderr)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` is alive (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process
    return True


def remove_stale_staging(target: Path) -> None:
    """Remove staging directories beside ``target`` left by runs whose process is gone."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.[^.]+\.partial")
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for p in entries:
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and not process_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


class StagedOutput:
    """A run's output directory, written atomically (see the module docstring).

    Use as a context manager: files go to :meth:`path`; :meth:`commit` moves them into the
    target (renaming the staging directory when the target does not exist yet, else moving
    file by file with the names in ``last`` at the end); leaving the block without a commit
    removes everything staged."""

    def __init__(
        self,
        target: str | Path,
        flag: str = "--out",
        run_files: str | None = None,
        overwrite: bool = False,
    ) -> None:
        self.target = check_output_dir(target, flag)
        self.flag, self.overwrite = flag, overwrite
        self.run_files = re.compile(run_files) if run_files else None
        earlier = self.earlier_run()
        blocked = [  # a directory where this run writes a file: found before any work
            p.name
            for p in (self.target.iterdir() if self.target.is_dir() else ())
            if self.run_files and self.run_files.fullmatch(p.name) and p.is_dir()
        ]
        if blocked:
            raise OutputError(
                f"{flag} {target}: {blocked[0]} there is a directory where this run writes a "
                f"file; move it, or choose another {flag}"
            )
        if earlier and not overwrite:
            shown = ", ".join(earlier[:3]) + (", ..." if len(earlier) > 3 else "")
            raise OutputError(
                f"{flag} {target} already holds an earlier run ({len(earlier)} file(s): "
                f"{shown}); choose another {flag}, or pass --overwrite to replace that run"
            )
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_staging(self.target)
            self.staging = Path(
                tempfile.mkdtemp(
                    prefix=f".{self.target.name}.{os.getpid()}.",
                    suffix=".partial",
                    dir=self.target.parent,
                )
            )
        except OSError as e:
            raise OutputError(f"{flag} {target}: cannot write there ({e.strerror})") from None
        self.committed = False
        self._sigterm = sigterm_exits()

    def earlier_run(self) -> list[str]:
        """The names of an earlier run's files in the target (those ``run_files`` matches)."""
        if self.run_files is None or not self.target.is_dir():
            return []
        return sorted(
            p.name
            for p in self.target.iterdir()
            if self.run_files.fullmatch(p.name) and not p.is_dir()
        )

    def path(self, name: str) -> Path:
        """Where to write the output file ``name`` during the run."""
        return self.staging / name

    def commit(self, last: tuple[str, ...] = ("manifest.jsonl",)) -> Path:
        """Move the staged files into the target directory; returns the target. An earlier
        run there (``--overwrite``) is swapped out whole: its files are moved aside first,
        the new ones moved in (``last`` at the end), and the aside ones deleted only then; a
        failure on the way (a name taken by a directory, a full disk, SIGTERM) moves the new
        files out and the earlier run back, so the target holds one run or the other."""
        if not self.target.exists():
            os.replace(self.staging, self.target)
            self.committed = True
            return self.target
        names = sorted(p.name for p in self.staging.iterdir())
        earlier = self.earlier_run()
        if earlier and not self.overwrite:  # another run finished there meanwhile
            raise OutputError(
                f"{self.flag} {self.target}: an earlier run appeared there during this one; "
                f"nothing was written"
            )
        for name in names:  # a new file's name taken by a directory (or a link): refused now
            there = self.target / name
            if os.path.lexists(there) and not there.is_symlink() and not there.is_file():
                raise OutputError(
                    f"{self.flag} {self.target}: {name} there is not a file (a directory?), so "
                    f"this run's {name} cannot replace it; nothing was replaced"
                )
        earlier = sorted({*earlier, *(n for n in names if os.path.lexists(self.target / n))})
        aside = Path(
            tempfile.mkdtemp(
                prefix=f".{self.target.name}.{os.getpid()}.",
                suffix=".partial",
                dir=self.target.parent,
            )
        )
        moved: list[str] = []
        placed: list[str] = []
        try:
            for name in sorted(earlier, key=lambda n: n not in last):  # the manifest first
                os.replace(self.target / name, aside / name)
                moved.append(name)
            for name in sorted(names, key=lambda n: n in last):  # the manifest last
                os.replace(self.staging / name, self.target / name)
                placed.append(name)
        except BaseException:
            for name in placed:
                os.replace(self.target / name, self.staging / name)
            for name in moved:
                os.replace(aside / name, self.target / name)
            shutil.rmtree(aside, ignore_errors=True)
            raise
        shutil.rmtree(aside, ignore_errors=True)
        self.staging.rmdir()
        self.committed = True
        return self.target

    def discard(self) -> None:
        """Remove everything staged."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> StagedOutput:
        self._sigterm.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        try:
            if not self.committed:
                self.discard()
        finally:
            self._sigterm.__exit__(kind, error, trace)
