"""Assembling separately trained stages into one model directory (``imagen export``)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from imagen.models.cascade import check_stage_chain
from imagen.models.model_dir import load_stage, read_index, save_model_dir
from imagen.training.rundir import RunDirectory
from imagen.utils.tensors import load_tensors


def export_model(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    weights: str = "ema",
    dtype: torch.dtype = torch.float16,
    notes: dict[str, Any] | None = None,
) -> Path:
    """Build a model directory from training runs, base stage first (the newest checkpoint of
    each; EMA weights by default). The text encoder must be the same for every stage."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    configs, states, records = [], [], []
    encoder: dict[str, Any] | None = None
    for rd in map(RunDirectory, run_dirs):
        cfg = rd.stage_config()
        ckpts = rd.checkpoints()
        if not ckpts:
            raise FileNotFoundError(f"{rd.path} has no complete checkpoint")
        te_full = rd.text_encoder()
        if encoder is None:
            encoder = te_full
        elif (encoder.get("name"), encoder.get("dim")) != (te_full.get("name"), te_full.get("dim")):
            raise ValueError(f"{rd.path} was trained with text encoder {te_full}, not {encoder}")
        configs.append(cfg)
        states.append(load_tensors(ckpts[-1] / f"{weights}.safetensors"))
        records.append(rd.training_record(ckpts[-1]))
    assert encoder is not None
    extra = {"training": records, "exported_weights": weights, "platform": platform.platform()}
    extra.update(notes or {})
    root = save_model_dir(out_dir, encoder, configs, states, dtype, extra)
    check_stage_chain(configs)
    for name in read_index(root)["stages"]:  # load each stage once: fail here, not at sampling
        load_stage(root / name)
    return root
