"""Model directories: the on-disk format of a cascade.

A model directory holds ``model_index.json`` (the text encoder and the stage order) and, per
stage, ``config.json`` and ``model.safetensors`` (fp16, bf16, fp32, or int8 weight-only).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from imagen.models.stage import Stage, StageConfig
from imagen.utils.tensors import dequantize, load_strict, load_tensors, quantize_int8, save_tensors

INDEX_FILE = "model_index.json"
FORMAT = "imagen-cascade"


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def save_model_dir(
    directory: str | Path,
    text_encoder: dict[str, Any],
    configs: list[StageConfig],
    states: list[dict[str, Tensor]],
    dtype: torch.dtype | None = torch.float16,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model_index.json`` and one sub-directory per stage; ``dtype`` is the weights'
    storage type: float16 (default), bfloat16, float32, or int8 (weight-only, per channel)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for k, (cfg, state) in enumerate(zip(configs, states, strict=True)):
        name = f"stage{k}"
        d = root / name
        d.mkdir(exist_ok=True)
        cfg = replace(cfg, text_encoder=dict(text_encoder))
        (d / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if dtype == torch.int8:
            save_tensors(quantize_int8(state), d / "model.safetensors")
        else:
            save_tensors(state, d / "model.safetensors", dtype)
        names.append(name)
    index = {"format": FORMAT, "version": 1, "text_encoder": text_encoder, "stages": names}
    index.update(extra or {})
    (root / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return root


def read_index(directory: str | Path) -> dict[str, Any]:
    """Read and validate a model directory's index."""
    root = Path(directory)
    path = root / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not an imagen model directory (no {INDEX_FILE})")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if index.get("format") != FORMAT or not index.get("stages"):
        raise ValueError(f"{path} is not an {FORMAT} index")
    return index


def load_stage(directory: str | Path, device: str | torch.device = "cpu") -> Stage:
    """Load one stage directory (config.json + model.safetensors), strictly."""
    d = Path(directory)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{d} has no config.json")
    stage = Stage(StageConfig.from_dict(json.loads(cfg_path.read_text())))
    state = dequantize(load_tensors(d / "model.safetensors"))
    load_strict(stage.unet, state, str(d / "model.safetensors"))
    return stage.to(device).eval()
