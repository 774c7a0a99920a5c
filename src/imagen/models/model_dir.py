"""Model directories: the on-disk format of a cascade.

A model directory holds ``model_index.json`` (the text encoder, the stage order and the sha256
of every stage file) and, per stage, ``config.json`` and ``model.safetensors`` (fp16, bf16,
fp32, or int8 weight-only). It is written into a temporary directory next to its place and
renamed into place when complete, so a failed write never damages a model already there. A
text encoder given as a local path is stored as an absolute path, so the model works from any
working directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from imagen.models import model_target, validate
from imagen.models.spaces import SPACE_WEIGHTS
from imagen.models.stage import Stage
from imagen.models.stage_config import StageConfig
from imagen.models.validate import file_sha256
from imagen.utils.config import ConfigError, load_json_file
from imagen.utils.files import fsync_dir, write_json
from imagen.utils.tensors import (
    load_strict,
    load_tensors,
    load_weights,
    quantize_int8,
    save_tensors,
)

INDEX_FILE = "model_index.json"
FORMAT = "imagen-cascade"
STAGE_FILES = ("config.json", "model.safetensors")
META_BUILD_BYTES = 64 << 20  # weights files from this size build their network on meta
NULL_TEXT_FILE = "null_text.safetensors"  # a stage's stored null caption, where it has one


@dataclass(frozen=True)
class WeightsFile:
    """A stage's weights as a safetensors file elsewhere (an imported DeepFloyd IF stage):
    hard-linked into the model directory, else (another file system) symbolically linked,
    or copied with ``copy``; its sha256 is recorded like any stage file's."""

    path: Path
    copy: bool = False


# a stage's weights: a state dict, a stage directory whose file is copied byte for byte, or a
# weights file to link
StageWeights = dict[str, Tensor] | Path | WeightsFile


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
def _link_or_copy(source: Path, path: Path, copy: bool) -> None:
    """Hard-link ``source`` to ``path`` (no copy of multi-GB weights), else symlink it (across
    file systems); copy it with ``copy``."""
    source = source.resolve()
    if not copy:
        try:
            os.link(source, path)
            return
        except OSError:
            try:
                os.symlink(source, path)
                return
            except OSError:
                pass
    shutil.copyfile(source, path)


def _write_weights(weights: StageWeights, path: Path, dtype: torch.dtype | None) -> None:
    """Write one weights file of a stage (``path.name`` names which: the network's or its
    space's); a Path is a stage directory whose file of that name is copied as stored."""
    if isinstance(weights, WeightsFile):
        _link_or_copy(weights.path, path, weights.copy)
    elif isinstance(weights, Path):
        shutil.copyfile(weights / path.name, path)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    elif dtype == torch.int8:
        save_tensors(quantize_int8(weights), path)
    else:
        save_tensors(weights, path, dtype)


def _write_model(
    root: Path,
    encoders: list[dict[str, Any]],
    configs: list[StageConfig],
    states: list[StageWeights],
    dtype: torch.dtype | None,
    extra: dict[str, Any],
    null_texts: list[tuple[Tensor, Tensor] | None],
    spaces: list[StageWeights | None],
) -> None:
    root.mkdir(parents=True)
    names, checksums = [], {}
    for k, (cfg, weights) in enumerate(zip(configs, states, strict=True)):
        name = f"stage{k}"
        (root / name).mkdir()
        cfg = replace(cfg, text_encoder=dict(encoders[k]))
        write_json(root / name / "config.json", cfg.to_dict(), atomic=False)
        _write_weights(weights, root / name / "model.safetensors", dtype)
        files = list(STAGE_FILES)
        if k < len(spaces) and spaces[k] is not None:  # a latent stage's VAE, never quantised
            _write_weights(spaces[k], root / name / SPACE_WEIGHTS, torch.float32)  # type: ignore[arg-type]
            files.append(SPACE_WEIGHTS)
        if k < len(null_texts) and null_texts[k] is not None:
            tokens, mask = null_texts[k]  # type: ignore[misc]
            save_tensors({"tokens": tokens, "mask": mask}, root / name / NULL_TEXT_FILE)
            files.append(NULL_TEXT_FILE)
        fsync_dir(root / name)
        checksums.update({f"{name}/{f}": file_sha256(root / name / f) for f in files})
        names.append(name)
    index = {"format": FORMAT, "version": 1, "text_encoder": encoders[0], "stages": names}
    index.update(extra)
    index["checksums"] = checksums
    write_json(root / INDEX_FILE, index, atomic=False)
    fsync_dir(root)


def check_model_target(
    directory: str | Path, overwrite: bool = False, stages: int = 0
) -> model_target.Target:
    """How a model of ``stages`` stages may be written at ``directory``: absent, empty, or a
    model directory this project wrote; anything else (a user's files, a diffusers pipeline's
    ``model_index.json``) is a FileExistsError, or with ``overwrite`` kept beside the new
    model (models/model_target.py). Cheap: commands call it before loading anything."""
    return model_target.check_target(
        Path(directory), (*STAGE_FILES, NULL_TEXT_FILE, SPACE_WEIGHTS), overwrite, stages
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
    text_encoder: dict[str, Any] | list[dict[str, Any]],
    configs: list[StageConfig],
    states: list[StageWeights],
    dtype: torch.dtype | None = torch.float16,
    extra: dict[str, Any] | None = None,
    verify: bool = False,
    null_texts: list[tuple[Tensor, Tensor] | None] | None = None,
    spaces: list[StageWeights | None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model_index.json`` and one sub-directory per stage; ``dtype`` is the weights'
    storage type: float16 (default), bfloat16, float32, or int8 (weight-only, per channel).
    ``text_encoder`` is one record for every stage or one per stage (the index records the
    first stage's). A stage given as a stage directory (a Path) is copied as it is stored, one
    given as a :class:`WeightsFile` is linked; ``null_texts`` are the stages' null captions
    where they have one (tokens (L, D), mask (L,)); ``spaces`` the weights of latent stages'
    spaces (their VAEs, kept in float32). With ``verify``, every stage is loaded from the new
    files before they replace what is at ``directory``. What is at ``directory`` is checked
    first (:func:`check_model_target`; ``overwrite`` keeps files that are not the earlier
    model's beside the new one)."""
    root = Path(directory)
    target = check_model_target(root, overwrite, len(configs))
    root.parent.mkdir(parents=True, exist_ok=True)
    model_target.remove_stale_staging(root.parent)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        records = text_encoder if isinstance(text_encoder, list) else [text_encoder] * len(configs)
        encoders = [portable_text_encoder(r) for r in records]
        _write_model(
            tmp, encoders, configs, states, dtype, extra or {}, null_texts or [], spaces or []
        )
        if verify:
            for k in range(len(configs)):
                load_stage(tmp / f"stage{k}")
        if target.merge:
            model_target.merge_into_place(tmp, target)
        else:
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
    index = load_json_file(path, INDEX_FILE)
    validate.check_index(index, path)  # schema, version, stage paths, checksum entries
    return index


def verify_stage(directory: str | Path) -> None:
    """Check a stage directory of a model: its files are there and match the sha256 recorded
    in the model's index (models written before checksums are checked for presence only)."""
    d = Path(directory)
    checksums = read_index(d.parent).get("checksums")
    optional = tuple(f for f in (NULL_TEXT_FILE, SPACE_WEIGHTS) if (d / f).is_file())
    for f in STAGE_FILES + optional:
        if not (d / f).is_file():
            raise FileNotFoundError(f"{d} has no {f}")
        want = validate.recorded_sha256(checksums, f"{d.name}/{f}", d.parent / INDEX_FILE)
        validate.verify_file(d / f, want, d.parent / INDEX_FILE)


def verify_model_dir(directory: str | Path) -> tuple[int, int]:
    """``imagen verify``: every file the index records hashed again in full (no stamp stands
    in, and the stamps of large files are renewed), then each stage's config and weights
    checked against its network built on the meta device. A one-line ValueError names every
    file that is missing or differs; returns the number of files and bytes hashed."""
    root = Path(directory)
    index = read_index(root)
    checksums = index.get("checksums")
    if not checksums:
        raise ValueError(f"{root} records no checksums (written before them): nothing to verify")
    bad, size = [], 0
    for key, want in checksums.items():
        stage, _, name = str(key).partition("/")
        path = validate.stage_path(root, stage) / name
        if not name or "/" in name or not path.is_file():
            bad.append(f"{key} (missing)")
            continue
        size += path.stat().st_size
        if validate.checked_sha256(path, full=True) != want:
            bad.append(f"{key} (damaged)")
    if bad:
        raise ValueError(
            f"{root}: {len(bad)} of {len(checksums)} file(s) do not match their sha256 in "
            f"{INDEX_FILE}: {', '.join(bad)}"
        )
    for name in index["stages"]:
        d = root / name
        with torch.device("meta"):
            stage = Stage(read_stage_config(d))
        validate.check_weights(stage.unet, d / "model.safetensors")
    return len(checksums), size


def read_stage_config(directory: str | Path) -> StageConfig:
    """The configuration of a stage directory (config.json)."""
    cfg_path = Path(directory) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{Path(directory)} has no config.json")
    try:
        cfg = StageConfig.from_dict(load_json_file(cfg_path, "stage config"))
    except ConfigError as e:  # name the file (the loader's own errors already do)
        raise ConfigError(e if str(cfg_path) in str(e) else f"{cfg_path}: {e}") from None
    validate.check_stage_config(cfg, str(cfg_path))
    return cfg


def read_null_text(directory: str | Path) -> tuple[Tensor, Tensor] | None:
    """A stage directory's stored null caption (tokens (L, D), mask (L,) bool), if it has one."""
    path = Path(directory) / NULL_TEXT_FILE
    if not path.is_file():
        return None
    t = load_tensors(path)
    if (
        set(t) != {"tokens", "mask"}
        or t["tokens"].ndim != 2
        or t["mask"].shape != t["tokens"].shape[:1]
    ):
        raise ValueError(f"{path}: expected tokens (L, D) and mask (L,)")
    return t["tokens"].float(), t["mask"].bool()


def init_stage(stage: Stage, directory: str | Path) -> None:
    """Give ``stage`` the weights (its space's too) and null caption of a model's stage
    directory (the start of a fine-tuning run), strictly."""
    d = Path(directory)
    load_strict(stage.unet, load_weights(d / "model.safetensors"), str(d / "model.safetensors"))
    load_space(stage, d)
    stage.null_text = read_null_text(d)


def load_space(stage: Stage, directory: Path, assign: bool = False) -> None:
    """Give a latent stage its space's weights (the VAE: ``space.safetensors``, float32)."""
    module = stage.space.weights()
    if module is None:
        return
    path = directory / SPACE_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {SPACE_WEIGHTS} (the stage's VAE)")
    validate.check_weights(module, path)
    load_strict(module, load_weights(path, torch.float32), str(path), assign=assign)


def meta_stage(directory: str | Path) -> Stage:
    """A stage directory's stage with its network on the meta device (no weights: a
    low-memory cascade loads them when the stage samples) and its null caption."""
    d = Path(directory)
    verify_stage(d)  # multi-GB weights are hashed once, then known by a stamp (validate.py)
    with torch.device("meta"):
        stage = Stage(read_stage_config(d))
    validate.check_weights(stage.unet, d / "model.safetensors")
    if stage.space.weights() is not None:
        validate.check_weights(stage.space.weights(), d / SPACE_WEIGHTS)
    stage.null_text = read_null_text(d)
    return stage.eval()


def load_stage(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Stage:
    """Load one stage directory (config.json + model.safetensors), strictly. A large network
    is built on the meta device and takes the file's tensors, in ``dtype`` (float32 by default):
    a large stage is never held twice, and bf16 weights loaded in bf16 are not copied. In a
    model directory its files are verified against the index's sha256 first, and the weights'
    names, shapes and dtypes against the network before any tensor is read."""
    d = Path(directory)
    if (d.parent / INDEX_FILE).is_file():
        verify_stage(d)
    config = read_stage_config(d)
    # a large stage is built on the meta device; a small one on the CPU, which costs less
    # than the first meta-device build (that imports torch's compiler)
    large = (d / "model.safetensors").stat().st_size >= META_BUILD_BYTES
    with torch.device("meta") if large else contextlib.nullcontext():
        stage = Stage(config)
    validate.check_weights(stage.unet, d / "model.safetensors")
    state = load_weights(d / "model.safetensors", dtype or torch.float32)
    load_strict(stage.unet, state, str(d / "model.safetensors"), assign=large)
    load_space(stage, d, assign=large)
    stage.null_text = read_null_text(d)
    return stage.to(device).eval()


def update_index(directory: str | Path, entries: dict[str, Any]) -> None:
    """Set top-level ``entries`` of a model directory's ``model_index.json`` (an evaluation
    record, notes), replacing the file atomically. The stages, their files and checksums are
    not entries that can be set here."""
    fixed = {"format", "version", "text_encoder", "stages", "checksums"} & set(entries)
    if fixed:
        raise ValueError(f"update_index cannot change {', '.join(sorted(fixed))}")
    path = Path(directory) / INDEX_FILE
    index = read_index(Path(directory))
    write_json(path, {**index, **entries})
