"""Where a model directory is written (``imagen import --out``, ``imagen export --out``): what
may be replaced there, and how, so that no file of the user's is lost.

A target is written over only when it is absent, empty, or a model directory this project
wrote: its ``model_index.json`` parses as an ``imagen-cascade`` index (a file of that name is
not enough; a diffusers pipeline has one too). Such a model holding nothing but its own files
is replaced whole; one with other files beside it, or a directory that is not a model, is
refused unless ``overwrite``, and then only the earlier model's own files (its index and its
stages' files) are replaced, everything else is kept: the new model is written aside, the
earlier one's files moved into a backup beside the target, the new ones moved in (the index
last), and the backup removed; a failure in between moves the earlier files back. Staging
and backup directories left by a process that was killed outright are removed by the next
write to the same parent directory.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from imagen.models import validate
from imagen.utils.config import load_json_file
from imagen.utils.outputs import process_alive

INDEX_FILE = "model_index.json"
# what a staging (.NAME.tmp-PID) or backup (.NAME.old-PID) directory of this module holds
STAGING = re.compile(r"\.(.+)\.(tmp|old)-(\d+)")
STAGING_ENTRY = re.compile(r"model_index\.json|stage\d+|stage\d+__[^/]+")


@dataclass
class Target:
    """A checked target: the earlier model's own files there (relative paths, the index
    first), and whether the new model goes beside other files (``merge``) or replaces the
    directory whole."""

    root: Path
    earlier: list[str] = field(default_factory=list)
    merge: bool = False


def _earlier_stages(root: Path) -> list[str]:
    """The stages of the model index at ``root``, or FileExistsError when it is not an index
    this project wrote (whatever the file is called)."""
    index = root / INDEX_FILE
    try:
        if index.is_symlink() or not index.is_file():
            raise ValueError("not a regular file")
        data = load_json_file(index, INDEX_FILE)
        validate.check_index(data, index)
    except (OSError, ValueError) as e:
        reason = str(e).replace(str(index), "").strip(" :") or type(e).__name__
        raise FileExistsError(
            f"refusing to write over {root}: its {INDEX_FILE} is not an imagen model index "
            f"({reason}); it holds something else (a diffusers pipeline?): choose another "
            f"directory"
        ) from None
    return list(data["stages"])


def check_target(
    root: Path, own_files: tuple[str, ...], overwrite: bool = False, stages: int = 0
) -> Target:
    """How a model of ``stages`` stages may be written at ``root`` (see the module
    docstring), or FileExistsError naming what would be lost."""
    if root.is_symlink() and not root.exists():
        raise FileExistsError(f"{root} is a symlink to {os.readlink(root)}, which does not exist")
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a directory")
    if not root.is_dir() or not any(root.iterdir()):
        return Target(root)
    listed: list[str] = []
    if (root / INDEX_FILE).exists() or (root / INDEX_FILE).is_symlink():
        listed = _earlier_stages(root)
        foreign = validate.foreign_files(root, own_files)
        if not foreign:
            return Target(root)  # a model and nothing else: replaced whole
        if not overwrite:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise FileExistsError(
                f"refusing to replace the model at {root}: it also holds {len(foreign)} "
                f"file(s) that are not part of the model ({shown}); move them out, choose "
                f"another directory, or pass --overwrite to replace the model's own files only"
            )
    elif not overwrite:
        raise FileExistsError(
            f"refusing to replace {root}: it is not empty and not a model directory (no "
            f"{INDEX_FILE}); choose another directory, or pass --overwrite to write the model "
            f"beside its files"
        )
    for k in range(stages):  # the new model's stage directories must be free or the model's
        d = root / f"stage{k}"
        taken = d.exists() or d.is_symlink()
        if taken and (d.name not in listed or d.is_symlink() or not d.is_dir()):
            raise FileExistsError(
                f"refusing to write the model into {root}: {d.name} there is not part of a "
                f"model; move it, or choose another directory"
            )
    earlier = [INDEX_FILE] if listed else []
    earlier += [f"{s}/{f}" for s in listed for f in own_files if (root / s / f).is_file()]
    return Target(root, earlier, merge=True)


def _backup_name(rel: str) -> str:
    return rel.replace("/", "__")


def merge_into_place(tmp: Path, target: Target) -> None:
    """Move the complete model at ``tmp`` into ``target.root`` beside the files kept there:
    the earlier model's own files go into a backup first, the new index is moved in last,
    and a failure moves the earlier files back."""
    root = target.root
    backup = root.with_name(f".{root.name}.old-{os.getpid()}")
    shutil.rmtree(backup, ignore_errors=True)
    backup.mkdir()
    moved: list[str] = []
    placed: list[Path] = []
    try:
        for rel in target.earlier:  # the index first: no index lists half a model
            os.replace(root / rel, backup / _backup_name(rel))
            moved.append(rel)
        for stage in sorted(p for p in tmp.iterdir() if p.is_dir()):
            if not (root / stage.name).exists():
                os.rename(stage, root / stage.name)
                placed.append(root / stage.name)
                continue
            for f in sorted(stage.iterdir()):
                os.replace(f, root / stage.name / f.name)
                placed.append(root / stage.name / f.name)
        os.replace(tmp / INDEX_FILE, root / INDEX_FILE)
    except OSError:
        for p in reversed(placed):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        for rel in reversed(moved):
            os.replace(backup / _backup_name(rel), root / rel)
        shutil.rmtree(backup, ignore_errors=True)
        raise
    for rel in {r.split("/")[0] for r in target.earlier if "/" in r}:
        d = root / rel  # an earlier stage the new model does not have, left empty
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    shutil.rmtree(backup, ignore_errors=True)


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove the staging and backup directories in ``parent`` that a model write of a
    process no longer alive left (killed outright: SIGKILL, a power cut); only directories
    that hold nothing but a model's entries are touched. Returns those removed."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = STAGING.fullmatch(p.name)
        if not m or p.is_symlink() or not p.is_dir() or int(m.group(3)) == os.getpid():
            continue
        if process_alive(int(m.group(3))):
            continue
        try:
            ours = all(STAGING_ENTRY.fullmatch(q.name) for q in p.iterdir())
        except OSError:
            continue
        if ours:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
