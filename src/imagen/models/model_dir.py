"""Model directories: the on-disk format of a cascade.

A model directory holds ``model_index.json`` (the text encoder, the stage order and the sha256
of every stage file) and, per stage, ``config.json`` and ``model.safetensors`` (fp16, bf16,
fp32, or int8 weight-only). It is written into a temporary directory next to its place and
renamed into place when complete, so a failed write never damages a model already there. A
text encoder given as a local path is stored as an absolute path, so the model works from any
working directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from imagen.models.stage import Stage, StageConfig
from imagen.utils.tensors import (
    dequantize,
    fsync_dir,
    load_strict,
    load_tensors,
    no_weight_init,
    quantize_int8,
    save_tensors,
)

INDEX_FILE = "model_index.json"
FORMAT = "imagen-cascade"
STAGE_FILES = ("config.json", "model.safetensors")
# a stage's weights: a state dict, or a stage directory whose file is copied byte for byte
StageWeights = dict[str, Tensor] | Path


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ---- text encoder paths --------------------------------------------------------------------
def _is_local_path(name: str) -> bool:
    """True when an encoder name is a filesystem path rather than a built-in or hub name: it
    is absolute, starts with ./ ../ or ~, or names an existing directory with a separator."""
    if name.startswith(("/", "./", "../", "~")) or os.path.isabs(name):
        return True
    return ("/" in name or os.sep in name) and Path(name).exists()


def portable_text_encoder(record: dict[str, Any]) -> dict[str, Any]:
    """The encoder record with a local path made absolute (resolved from the current
    directory), so a model directory does not depend on where it is used from."""
    name = str(record.get("name", ""))
    if not _is_local_path(name):
        return dict(record)
    return {**record, "name": str(Path(name).expanduser().resolve())}


def check_text_encoder(record: dict[str, Any], root: str | Path) -> dict[str, Any]:
    """The encoder record of model ``root``, after checking that a local encoder path it
    names exists from here; a clear error otherwise (``load_cascade`` calls this before it
    loads the encoder)."""
    name = str(record.get("name", ""))
    if _is_local_path(name) and not Path(name).expanduser().exists():
        hint = "" if os.path.isabs(name) else " (a relative path, from the current directory)"
        raise FileNotFoundError(
            f"the text encoder of {root} is not found at {name}{hint}; put it there, or pass "
            f"the encoder explicitly"
        )
    return record


# ---- writing -------------------------------------------------------------------------------
def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_weights(weights: StageWeights, path: Path, dtype: torch.dtype | None) -> None:
    if isinstance(weights, Path):
        shutil.copyfile(weights / "model.safetensors", path)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    elif dtype == torch.int8:
        save_tensors(quantize_int8(weights), path)
    else:
        save_tensors(weights, path, dtype)


def _write_model(
    root: Path,
    text_encoder: dict[str, Any],
    configs: list[StageConfig],
    states: list[StageWeights],
    dtype: torch.dtype | None,
    extra: dict[str, Any],
) -> None:
    root.mkdir(parents=True)
    names, checksums = [], {}
    for k, (cfg, weights) in enumerate(zip(configs, states, strict=True)):
        name = f"stage{k}"
        (root / name).mkdir()
        cfg = replace(cfg, text_encoder=dict(text_encoder))
        _write_json(root / name / "config.json", cfg.to_dict())
        _write_weights(weights, root / name / "model.safetensors", dtype)
        fsync_dir(root / name)
        checksums.update({f"{name}/{f}": file_sha256(root / name / f) for f in STAGE_FILES})
        names.append(name)
    index = {"format": FORMAT, "version": 1, "text_encoder": text_encoder, "stages": names}
    index.update(extra)
    index["checksums"] = checksums
    _write_json(root / INDEX_FILE, index)
    fsync_dir(root)


def _check_target(root: Path) -> None:
    """Refuse to replace anything but a model directory or an empty directory."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and not (root / INDEX_FILE).is_file():
        raise FileExistsError(
            f"refusing to replace {root}: it is not empty and not a model directory "
            f"(no {INDEX_FILE})"
        )


def _swap_into_place(tmp: Path, root: Path) -> None:
    """Rename the complete ``tmp`` to ``root``; a model already there is moved aside first and
    deleted once the new one is in place."""
    old = root.with_name(f".{root.name}.old-{os.getpid()}")
    if root.exists():
        os.rename(root, old)
    try:
        os.rename(tmp, root)
    except OSError:
        if old.exists():
            os.rename(old, root)
        raise
    fsync_dir(root.parent)
    shutil.rmtree(old, ignore_errors=True)


def save_model_dir(
    directory: str | Path,
    text_encoder: dict[str, Any],
    configs: list[StageConfig],
    states: list[StageWeights],
    dtype: torch.dtype | None = torch.float16,
    extra: dict[str, Any] | None = None,
    verify: bool = False,
) -> Path:
    """Write ``model_index.json`` and one sub-directory per stage; ``dtype`` is the weights'
    storage type: float16 (default), bfloat16, float32, or int8 (weight-only, per channel).
    A stage given as a stage directory (a Path) is copied as it is stored. With ``verify``,
    every stage is loaded from the new files before they replace what is at ``directory``."""
    root = Path(directory)
    _check_target(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        te = portable_text_encoder(text_encoder)
        _write_model(tmp, te, configs, states, dtype, extra or {})
        if verify:
            for k in range(len(configs)):
                load_stage(tmp / f"stage{k}")
        _swap_into_place(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# ---- reading -------------------------------------------------------------------------------
def read_index(directory: str | Path) -> dict[str, Any]:
    """Read and validate a model directory's index."""
    root = Path(directory)
    path = root / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not an imagen model directory (no {INDEX_FILE})")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT or not index.get("stages"):
        raise ValueError(f"{path} is not an {FORMAT} index")
    stages, te = index["stages"], index.get("text_encoder")
    if not isinstance(stages, list) or not all(isinstance(s, str) for s in stages):
        raise ValueError(f"{path}: stages must be a list of stage directory names")
    if not isinstance(te, dict) or not isinstance(te.get("name"), str):
        raise ValueError(f"{path}: text_encoder must be a record with a name")
    return index


def verify_stage(directory: str | Path) -> None:
    """Check a stage directory of a model: its files are there and match the sha256 recorded
    in the model's index (models written before checksums are checked for presence only)."""
    d = Path(directory)
    checksums = read_index(d.parent).get("checksums") or {}
    for f in STAGE_FILES:
        if not (d / f).is_file():
            raise FileNotFoundError(f"{d} has no {f}")
        want = checksums.get(f"{d.name}/{f}")
        if want is not None and file_sha256(d / f) != want:
            raise ValueError(f"{d / f} does not match its sha256 in {INDEX_FILE} (damaged)")


def read_stage_config(directory: str | Path) -> StageConfig:
    """The configuration of a stage directory (config.json)."""
    cfg_path = Path(directory) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{Path(directory)} has no config.json")
    return StageConfig.from_dict(json.loads(cfg_path.read_text()))


def load_stage(directory: str | Path, device: str | torch.device = "cpu") -> Stage:
    """Load one stage directory (config.json + model.safetensors), strictly."""
    d = Path(directory)
    config = read_stage_config(d)
    with no_weight_init():  # every weight is loaded from the file, strictly, below
        stage = Stage(config)
    state = dequantize(load_tensors(d / "model.safetensors"))
    load_strict(stage.unet, state, str(d / "model.safetensors"))
    return stage.to(device).eval()
