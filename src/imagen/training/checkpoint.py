"""Atomic, checksummed, exactly resumable training checkpoints, with no pickle.

A checkpoint is a directory ``RUN_DIR/checkpoints/step_00001000`` holding
``model.safetensors``, ``ema.safetensors``, ``optimizer.safetensors`` (the optimiser state's
tensors) and ``state.json`` (step, samples seen, counters, the optimiser's non-tensor state,
the sha256 of each weights file, and a sha256 of state.json's own content). It is written
under a temporary name, every file fsynced, then renamed into place in one atomic step, so a
process killed at any moment leaves the previous checkpoint or the new one, never a broken
one. The last K are kept; checkpoints of the same or later steps, left by a run that resumed
before them because they were damaged, are moved aside to ``checkpoints/damaged-step_N``.

Checkpoints written before checksums existed (version 0.1: no checksums, optimiser state
keyed by parameter index) are still read: their files are checked to be complete
safetensors, with a warning that their bytes cannot be verified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from imagen.models.model_dir import file_sha256
from imagen.utils.files import fsync_dir, write_json
from imagen.utils.tensors import load_tensors, save_tensors

log = logging.getLogger(__name__)

PREFIX = "step_"
TMP_PREFIX = ".tmp-"
DAMAGED_PREFIX = "damaged-"
STATE_FILE = "state.json"
WEIGHT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")
CHECKSUMS = "checksums"  # in state.json: weights file name -> sha256
STATE_DIGEST = "state_sha256"  # in state.json: sha256 of the rest of state.json


class CheckpointError(ValueError):
    """A damaged or inconsistent checkpoint (the message is one line naming it)."""


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimiser state dict (keyed by parameter name or index) into tensors, named
    ``PARAM/FIELD`` for safetensors, and JSON-able metadata."""
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {"param_groups": state["param_groups"], "scalars": {}}
    for param, entry in state["state"].items():
        for name, value in entry.items():
            key = f"{param}/{name}"
            if isinstance(value, Tensor):
                tensors[key] = value
            else:
                meta["scalars"][key] = value
    return tensors, meta


def unflatten_optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[Any, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        # PARAM/FIELD; checkpoints of version 0.1 wrote INDEX.FIELD
        param, name = key.rsplit("/", 1) if "/" in key else key.split(".", 1)
        state.setdefault(int(param) if param.isdigit() else param, {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def step_of(path: Path) -> int:
    """The step a checkpoint directory is named after."""
    return int(path.name[len(PREFIX) :])


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints in a run's checkpoints directory ``root``, oldest first
    (temporary directories are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.name.startswith(PREFIX)
        and p.name[len(PREFIX) :].isdigit()
        and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=step_of)


def _digest(record: dict[str, Any]) -> str:
    """sha256 of a JSON record without its own digest field."""
    body = {k: v for k, v in record.items() if k != STATE_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_checkpoint(
    root: Path,
    step: int,
    model_state: dict[str, Tensor],
    ema_state: dict[str, Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write a checkpoint into the checkpoints directory ``root`` (RunDirectory knows where
    it is) atomically, then delete all but the newest ``keep`` up to it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    opt_tensors, opt_meta = flatten_optimizer_state(optimizer_state)
    for name, tensors in zip(WEIGHT_FILES, (model_state, ema_state, opt_tensors), strict=True):
        save_tensors(tensors, tmp / name)
    record = {**state, "step": step, "optimizer": opt_meta}
    record[CHECKSUMS] = {name: file_sha256(tmp / name) for name in WEIGHT_FILES}
    record[STATE_DIGEST] = _digest(record)
    write_json(tmp / STATE_FILE, record, atomic=False)
    fsync_dir(tmp)
    if final.exists():  # the same step, from a run that resumed before it: found damaged
        _move_aside(final)
    os.rename(tmp, final)
    fsync_dir(root)
    _prune(root, final, keep)
    for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a killed writer
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _move_aside(ckpt: Path) -> None:
    aside = ckpt.with_name(f"{DAMAGED_PREFIX}{ckpt.name}")
    if aside.exists():
        shutil.rmtree(aside)
    os.rename(ckpt, aside)
    log.warning("moved %s aside to %s: this run superseded it", ckpt, aside.name)


def _prune(root: Path, newest: Path, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints up to ``newest`` (just written and hashed). Later
    ones can only be checkpoints a resumed run found damaged: they are moved aside, never
    deleted, and never counted as kept."""
    ckpts = checkpoint_dirs(root)
    for later in [p for p in ckpts if step_of(p) > step_of(newest)]:
        _move_aside(later)
    for old in [p for p in ckpts if step_of(p) <= step_of(newest)][:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---- verification --------------------------------------------------------------------------
_VERIFIED: dict[tuple[str, int, int, int], str] = {}  # (path, size, mtime, inode) -> sha256
_WARNED: set[str] = set()  # checkpoints without checksums already reported


def _sha256_once(path: Path) -> str:
    """sha256 of a file, remembered while the file is unchanged (resume verifies a checkpoint,
    then reads it: its files are hashed once)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _VERIFIED:
        _VERIFIED[key] = file_sha256(path)
    return _VERIFIED[key]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_record(path: Path, record: Any) -> None:
    """Raise unless state.json's fields are present, typed and consistent with the directory."""
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: {STATE_FILE} does not hold a JSON object")
    digest = record.get(STATE_DIGEST)
    if (CHECKSUMS in record or digest is not None) and digest != _digest(record):
        raise CheckpointError(f"{path}: {STATE_FILE} does not match its checksum")
    if record.get("step") != step_of(path) or not _is_count(record.get("step")):
        raise CheckpointError(
            f"{path}: {STATE_FILE} claims step {record.get('step')!r}, not {step_of(path)}"
        )
    if "samples_seen" not in record:
        raise CheckpointError(f"{path}: {STATE_FILE} has no samples_seen")
    for name in ("samples_seen", "bad_steps"):
        if name in record and not _is_count(record[name]):
            raise CheckpointError(f"{path}: {STATE_FILE} has a bad {name}: {record[name]!r}")
    opt = record.get("optimizer")
    if not (
        isinstance(opt, dict)
        and isinstance(opt.get("param_groups"), list)
        and isinstance(opt.get("scalars"), dict)
    ):
        raise CheckpointError(f"{path}: {STATE_FILE} has no valid optimizer record")


def _check_files(path: Path, checksums: Any, files: tuple[str, ...] = WEIGHT_FILES) -> None:
    """Raise unless each of ``files`` is there and matches its checksum (old checkpoints: is a
    complete safetensors file)."""
    if checksums is not None and not (
        isinstance(checksums, dict) and set(checksums) == set(WEIGHT_FILES)
    ):
        raise CheckpointError(f"{path}: {STATE_FILE} has an invalid {CHECKSUMS} record")
    for name in files:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if checksums is not None:
            if _sha256_once(f) != checksums[name]:
                raise CheckpointError(f"{path}: {name} does not match its sha256 (damaged)")
            continue
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: {name} is not a complete safetensors file: {e}") from e


def verify_checkpoint(path: Path, files: tuple[str, ...] = WEIGHT_FILES) -> dict[str, Any]:
    """Check a checkpoint without loading its tensors: state.json valid and consistent with
    the directory name, the weights ``files`` (all by default; export needs only the one it
    reads) matching their checksums; returns state.json's record. Raises
    :class:`CheckpointError` (one line) when it is damaged."""
    path = Path(path)
    try:
        record = json.loads((path / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: {STATE_FILE} is unreadable: {e}") from e
    _check_record(path, record)
    _check_files(path, record.get(CHECKSUMS), files)
    if CHECKSUMS not in record and str(path) not in _WARNED:
        _WARNED.add(str(path))
        log.warning("%s has no checksums (written by an older version): accepted unverified", path)
    return record


def _load(path: Path, name: str) -> dict[str, Tensor]:
    try:
        return load_tensors(path / name)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: {name} cannot be read: {e}") from e


def _finite(path: Path, name: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{path}: {name}.safetensors holds non-finite values in {key}")
    return tensors


def read_weights(path: Path, name: str) -> dict[str, Tensor]:
    """The ``model`` or ``ema`` weights of a checkpoint, verified (finite); the other files of
    the checkpoint need not be there (a run copied without its optimiser state exports)."""
    verify_checkpoint(path, (f"{name}.safetensors",))
    return _finite(path, name, _load(path, f"{name}.safetensors"))


def read_checkpoint(
    path: Path,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """Model state, EMA state, optimiser state and the rest of state.json of a verified
    checkpoint (see :func:`verify_checkpoint`); model and EMA weights must be finite."""
    path = Path(path)
    state = verify_checkpoint(path)
    for key in (CHECKSUMS, STATE_DIGEST):
        state.pop(key, None)
    opt_tensors = _load(path, "optimizer.safetensors")
    try:
        opt = unflatten_optimizer_state(opt_tensors, state.pop("optimizer"))
    except (KeyError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: the optimizer state is malformed: {e}") from e
    model = _finite(path, "model", _load(path, "model.safetensors"))
    ema = _finite(path, "ema", _load(path, "ema.safetensors"))
    return model, ema, opt, state
