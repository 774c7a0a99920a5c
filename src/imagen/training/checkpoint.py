"""Atomic, exactly resumable training checkpoints, with no pickle.

A checkpoint is a directory ``RUN_DIR/checkpoints/step_00001000`` holding
``model.safetensors``, ``ema.safetensors``, ``optimizer.safetensors`` (the optimiser state's
tensors) and ``state.json`` (step, samples seen, counters, the optimiser's non-tensor state).
It is written under a temporary name, every file fsynced, then renamed into place in one
atomic step, so a process killed at any moment leaves the previous checkpoint or the new one,
never a broken one. The last K are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import Tensor

from imagen.utils.tensors import fsync_dir, load_tensors, save_tensors

PREFIX = "step_"
TMP_PREFIX = ".tmp-"


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


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, Tensor],
    ema_state: dict[str, Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write a checkpoint atomically, then delete all but the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_tensors(model_state, tmp / "model.safetensors")
    save_tensors(ema_state, tmp / "ema.safetensors")
    opt_tensors, opt_meta = flatten_optimizer_state(optimizer_state)
    save_tensors(opt_tensors, tmp / "optimizer.safetensors")
    with open(tmp / "state.json", "w") as f:
        json.dump({**state, "step": step, "optimizer": opt_meta}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():  # a checkpoint of the same step from an earlier attempt
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a killed writer
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def read_checkpoint(
    path: Path,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """Model state, EMA state, optimiser state and the rest of state.json of a checkpoint."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    opt = unflatten_optimizer_state(
        load_tensors(path / "optimizer.safetensors"), state.pop("optimizer")
    )
    return (
        load_tensors(path / "model.safetensors"),
        load_tensors(path / "ema.safetensors"),
        opt,
        state,
    )
