"""Assembling separately trained stages into one model directory (``imagen export``).

Everything is checked before anything is written: the stage chain, the text encoder, the
checksums of every checkpoint and stage used, and that the weights fit their configurations.
The model directory is then written beside its place and renamed into place
(:func:`~imagen.models.model_dir.save_model_dir`): a failing export leaves a model already
there untouched.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from imagen.models.cascade import check_stage_chain
from imagen.models.model_dir import (
    INDEX_FILE,
    StageWeights,
    check_model_target,
    read_index,
    read_null_text,
    read_stage_config,
    save_model_dir,
    verify_stage,
)
from imagen.models.sampling import SamplingOverrides
from imagen.models.spaces import SPACE_WEIGHTS
from imagen.models.stage import Stage
from imagen.models.stage_config import StageConfig
from imagen.training.checkpoint import read_weights
from imagen.training.config import init_stage_dir
from imagen.training.rundir import OPTIONS_FILE, RunDirectory
from imagen.utils.tensors import check_state


@dataclass
class StageSource:
    """One stage of an export: its configuration, text encoder record, weights (a state dict
    from a run, or a stage directory copied as stored) and training record."""

    origin: Path
    config: StageConfig
    text_encoder: dict[str, Any]
    weights: StageWeights
    training: dict[str, Any]
    null_text: tuple[torch.Tensor, torch.Tensor] | None = None  # the stage's stored null caption
    vocabulary: list[str] | None = None  # the words of its training captions, where known
    space: StageWeights | None = None  # a latent stage's frozen VAE: a stage directory holding it


def _from_run(rd: RunDirectory, weights: str) -> StageSource:
    """The newest usable checkpoint of a run (a damaged newer one is skipped with a warning)."""
    ckpt = rd.latest_checkpoint((f"{weights}.safetensors",))
    state = read_weights(ckpt, weights)
    opts = rd.read_options()
    entry = opts["config"]["stages"][opts["stage_index"]]
    init = entry.get("init")
    init_dir = init_stage_dir(init) if init else None
    null = read_null_text(init_dir) if init_dir else None
    if (entry.get("train") or {}).get("lora"):  # an adapter: merged into its base here
        from imagen.training.lora_export import merged_run_state

        state = merged_run_state(rd, state)
    record = rd.training_record(ckpt)
    config = rd.stage_config()
    space = _space_source(config, init_dir, rd.path)
    return StageSource(
        rd.path, config, rd.text_encoder(), state, record, null, rd.vocabulary(), space
    )


def _space_source(config: StageConfig, stage_dir: Path | None, origin: Path) -> Path | None:
    """Where a latent stage's VAE weights are (the stage directory it was trained from)."""
    if config.space.kind == "pixels":
        return None
    if stage_dir is None or not (stage_dir / SPACE_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{origin}: its VAE ({SPACE_WEIGHTS}) comes from the model it was fine-tuned from, "
            f"{stage_dir or 'which the run does not name'}; it is not there"
        )
    return stage_dir


def _from_model(stage_dir: Path) -> StageSource:
    """A stage of an existing model directory, with the training record the model kept."""
    index = read_index(stage_dir.parent)
    if stage_dir.name not in index["stages"]:
        raise ValueError(f"{stage_dir.parent} has no stage {stage_dir.name!r}: {index['stages']}")
    verify_stage(stage_dir)
    k = index["stages"].index(stage_dir.name)
    records = index.get("training")
    record = records[k] if isinstance(records, list) and k < len(records) else None
    if not isinstance(record, dict):
        record = {"copied_from": f"{stage_dir.parent.name}/{stage_dir.name}"}
    config = read_stage_config(stage_dir)
    return StageSource(
        stage_dir,
        config,
        dict(config.text_encoder or index["text_encoder"]),
        stage_dir,
        record,
        read_null_text(stage_dir),
        index.get("vocabulary"),
        _space_source(config, stage_dir, stage_dir),
    )


def stage_source(item: str | Path, weights: str) -> StageSource:
    """A run directory (its newest usable checkpoint), or a stage directory of a model
    (``MODEL_DIR/stageK``, copied as stored)."""
    p = Path(item)
    if (p / OPTIONS_FILE).is_file():
        return _from_run(RunDirectory(p), weights)
    if (p / "config.json").is_file() and (p.parent / INDEX_FILE).is_file():
        return _from_model(p)
    raise FileNotFoundError(
        f"{p} is neither a training run (no {OPTIONS_FILE}) nor a stage of a model directory "
        f"(MODEL_DIR/stageK)"
    )


def check_sources(sources: list[StageSource]) -> None:
    """Raise unless the stages form a cascade and their weights fit their configurations
    (checked on the meta device: no memory is used). Each stage keeps its own text encoder
    record (a cascade may read several: IF's T5 and the x4 upscaler's CLIP)."""
    check_stage_chain([s.config for s in sources])
    for s in sources:
        if isinstance(s.weights, dict):
            with torch.device("meta"):
                unet = Stage(s.config).unet
            check_state(unet, s.weights, f"{s.origin} ({len(s.weights)} tensors)")


def export_model(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    weights: str = "ema",
    dtype: torch.dtype = torch.float16,
    notes: dict[str, Any] | None = None,
    sampling: SamplingOverrides | None = None,
    overwrite: bool = False,
) -> Path:
    """Build a model directory from its stages, base stage first. Each item is a training run
    directory (the newest checkpoint that verifies; EMA weights by default) or a stage
    directory of an existing model, ``MODEL_DIR/stageK``, which is copied as stored (int8
    stays int8, whatever ``dtype``) with the training record that model kept, so one stage
    can be replaced without the runs of the others; ``out_dir`` may be that same model. The
    text encoder must be the same for every stage. A model at ``out_dir`` is replaced only by
    a complete, loadable one. ``sampling`` changes the stages' default sampling settings (one
    value for every stage or one per stage, resolved as the pipeline resolves a call's). What is
    at ``out_dir`` is checked before anything is read (``overwrite``: see
    :func:`~imagen.models.model_dir.check_model_target`)."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if not run_dirs:
        raise ValueError("nothing to export: name at least one run or stage directory")
    check_model_target(out_dir, overwrite, len(run_dirs))
    sources = [stage_source(item, weights) for item in run_dirs]
    if sampling is not None:
        configs = sampling.apply([src.config.sampling for src in sources])
        for src, changed in zip(sources, configs, strict=True):
            src.config = replace(src.config, sampling=changed)
    check_sources(sources)
    extra = {
        "training": [s.training for s in sources],
        "exported_weights": weights,
        "platform": platform.platform(),
    }
    if all(s.vocabulary is not None for s in sources):  # a prompt's unknown words are named
        extra["vocabulary"] = sorted({w for s in sources for w in s.vocabulary or []})
    extra.update(notes or {})
    return save_model_dir(
        out_dir,
        [s.text_encoder for s in sources],
        [s.config for s in sources],
        [s.weights for s in sources],
        dtype,
        extra,
        verify=True,
        null_texts=[s.null_text for s in sources],
        spaces=[s.space for s in sources],
        overwrite=overwrite,
    )


def replace_stage(
    model_dir: str | Path, stage: int, run_dir: str | Path, out_dir: str | Path, dtype: torch.dtype
) -> Path:
    """The model at ``model_dir`` with stage ``stage`` replaced by the run at ``run_dir`` (a
    distilled or fine-tuned student), written to ``out_dir``; the other stages are copied as
    stored."""
    names = read_index(model_dir)["stages"]
    items: list[str | Path] = [Path(model_dir) / n for n in names]
    items[stage] = Path(run_dir)
    return export_model(items, out_dir, dtype=dtype)
