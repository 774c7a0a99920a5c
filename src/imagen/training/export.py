"""Assembling separately trained stages into one model directory (``imagen export``)."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from imagen.models.cascade import (
    StageConfig,
    check_stage_chain,
    load_stage,
    read_index,
    save_model_dir,
)
from imagen.training.checkpoint import checkpoint_dirs
from imagen.utils.tensors import load_tensors


def _training_record(run_dir: Path, ckpt: Path) -> dict[str, Any]:
    """Steps, wall time and hardware of a training run, from its log."""
    rec: dict[str, Any] = {"run_dir": run_dir.name, "checkpoint": ckpt.name}
    state = json.loads((ckpt / "state.json").read_text())
    rec["steps"] = state["step"]
    rec["samples_seen"] = state["samples_seen"]
    log = run_dir / "log.jsonl"
    if log.is_file():
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r["step"] <= state["step"]]
        if rows:
            # sums over the logged intervals: robust to restarts (resumed runs append to the log;
            # steps redone after a restart count in the wall time, as they cost it)
            wall = sum(r.get("log_interval_s", 0.0) for r in rows)
            rec["wall_time_s"] = round(wall, 1)
            rec["final_loss"] = rows[-1]["loss"]
            hardware: dict[str, float] = {}
            for r in rows:
                key = r.get("hardware") or "unknown"
                hardware[key] = hardware.get(key, 0.0) + r.get("log_interval_s", 0.0)
            rec["hardware"] = {k: f"{v / 60:.0f} min" for k, v in hardware.items()}
    return rec


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
    for rd in map(Path, run_dirs):
        opts_path = rd / "training_options.json"
        if not opts_path.is_file():
            raise FileNotFoundError(f"{rd} is not a training run (no training_options.json)")
        ckpts = checkpoint_dirs(rd)
        if not ckpts:
            raise FileNotFoundError(f"{rd} has no complete checkpoint")
        opts = json.loads(opts_path.read_text())
        stage_dict = opts["config"]["stages"][opts["stage_index"]]["stage"]
        te = dict(opts["config"]["text_encoder"])
        cfg = StageConfig.from_dict(stage_dict)
        te_full = cfg.text_encoder or te
        if encoder is None:
            encoder = te_full
        elif (encoder.get("name"), encoder.get("dim")) != (te_full.get("name"), te_full.get("dim")):
            raise ValueError(f"{rd} was trained with text encoder {te_full}, not {encoder}")
        configs.append(cfg)
        states.append(load_tensors(ckpts[-1] / f"{weights}.safetensors"))
        records.append(_training_record(rd, ckpts[-1]))
    assert encoder is not None
    extra = {"training": records, "exported_weights": weights, "platform": platform.platform()}
    extra.update(notes or {})
    root = save_model_dir(out_dir, encoder, configs, states, dtype, extra)
    check_stage_chain(configs)
    for name in read_index(root)["stages"]:  # load each stage once: fail here, not at sampling
        load_stage(root / name)
    return root
