"""Exporting a LoRA run (``train.lora``): as a LoRA folder in diffusers' format
(``imagen export RUN --format lora``), or merged into its base stage, where the run is a
stage of a model directory or a diffusers pipeline export.

A LoRA folder holds ``pytorch_lora_weights.safetensors`` (diffusers' layout for IF's U-Net,
``unet.<module>.lora_A.weight`` / ``lora_B.weight``, the scale alpha / rank folded into lora_B;
diffusers' adapter metadata and this project's record, with the stage it adapts, in the
header), ``lora.json`` (the same record), ``README.md`` (how to use it with diffusers and
here) and, for a DeepFloyd IF base, ``scheduler/scheduler_config.json``: the base's DDPM
scheduler with ``variance_type="fixed_small"``, the change diffusers' README has IF users make
by hand (the LoRA trains the prediction only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from imagen.models.lora import merged_state, save_lora
from imagen.models.lora_spec import LORA_WEIGHT_NAME, LoraSettings
from imagen.models.model_dir import load_stage, read_stage_config
from imagen.models.stage_config import fine_tuned_config
from imagen.training.checkpoint import read_weights
from imagen.training.config import init_stage_dir
from imagen.training.diffusers_format import scheduler_config
from imagen.training.lora import peft_config
from imagen.training.rundir import RunDirectory
from imagen.utils.config import config_from_dict
from imagen.utils.files import fsync_dir, replacing_directory, write_json

RECORD_FILE = "lora.json"
FORMAT = "imagen-lora"


def run_settings(rd: RunDirectory) -> tuple[LoraSettings, str, int] | None:
    """A run's LoRA settings, its base (``init``) and the base stage's index; None for a
    run that trained a whole stage."""
    opts = rd.read_options()
    entry = opts["config"]["stages"][opts["stage_index"]]
    lora = (entry.get("train") or {}).get("lora")
    if not lora:
        return None
    init = str(entry["init"])
    stage = int(init.rpartition(":")[2]) if init.rpartition(":")[2].isdigit() else 0
    return config_from_dict(LoraSettings, lora, "train.lora"), init, stage


def is_lora_run(path: str | Path) -> bool:
    """Whether ``path`` is a training run that trained a LoRA adapter."""
    rd = RunDirectory(path)
    return rd.options_path.is_file() and run_settings(rd) is not None


def merged_run_state(rd: RunDirectory, adapter: dict[str, Tensor]) -> dict[str, Tensor]:
    """The base stage's weights (float32) with a LoRA run's adapter merged in."""
    found = run_settings(rd)
    assert found is not None
    settings, init, _ = found
    stage = load_stage(init_stage_dir(init), "cpu", torch.float32)
    return merged_state(stage, peft_config(settings), adapter)


def _readme(record: dict[str, Any], diffusers: bool) -> str:
    base, k = record["base"], record["stage"]
    lines = [
        f"# LoRA for stage {k} of {base}",
        "",
        f"Trained with imagen: rank {record['rank']}, alpha {record['alpha']} (folded into lora_B, so",
        f"it applies at scale 1), adapting {', '.join(record['targets'])}.",
        "",
        "## imagen",
        "",
        "```bash",
        f'imagen sample "PROMPT" --model {base.rpartition(":")[0] or base} --lora THIS_FOLDER:1.0@{k}',
        "```",
    ]
    if diffusers:
        lines += [
            "",
            "## diffusers",
            "",
            "The LoRA trained the noise prediction only, so sample with the fixed posterior variance",
            '(`variance_type="fixed_small"`, saved in `scheduler/` here):',
            "",
            "```python",
            "from diffusers import DDPMScheduler, IFPipeline",
            'pipe = IFPipeline.from_pretrained("DeepFloyd/IF-I-XL-v1.0")  # the base it was trained on',
            'pipe.load_lora_weights("THIS_FOLDER")',
            'pipe.scheduler = DDPMScheduler.from_pretrained("THIS_FOLDER", subfolder="scheduler")',
            "```",
        ]
    else:
        lines += ["", "Its base is this project's own U-Net, which diffusers cannot load."]
    return "\n".join(lines) + "\n"


def export_lora(run_dir: str | Path, out_dir: str | Path, weights: str = "ema") -> Path:
    """Write a LoRA run's adapter (its newest usable checkpoint; EMA weights by default) as a
    LoRA folder at ``out_dir`` (see the module's docstring); an earlier export there is
    replaced, anything else is refused."""
    rd = RunDirectory(run_dir)
    found = run_settings(rd) if rd.options_path.is_file() else None
    if found is None:
        raise ValueError(f"{run_dir} is not a LoRA training run (train.lora); export it as a stage")
    settings, init, k = found
    ckpt = rd.latest_checkpoint((f"{weights}.safetensors",))
    state = read_weights(ckpt, weights)
    base = read_stage_config(init_stage_dir(init))
    record = {
        "format": FORMAT,
        "version": 1,
        "base": init,
        "stage": k,
        "network": base.network,
        "rank": settings.rank,
        "alpha": settings.lora_alpha,
        "targets": list(settings.targets or []),
        "exported_weights": weights,
        "sampling": {"ddpm_variance": "posterior", "diffusers_variance_type": "fixed_small"},
        "training": rd.training_record(ckpt),
    }
    root = Path(out_dir)
    with replacing_directory(root, (root / RECORD_FILE).is_file(), "LoRA export") as tmp:
        tmp.mkdir(parents=True)
        save_lora(tmp / LORA_WEIGHT_NAME, state, settings.rank, settings.lora_alpha, record)
        write_json(tmp / RECORD_FILE, record, atomic=False)
        is_if = base.network == "diffusers-unet"
        (tmp / "README.md").write_text(_readme(record, is_if))
        if is_if:
            (tmp / "scheduler").mkdir()
            sched = scheduler_config(fine_tuned_config(base))
            write_json(tmp / "scheduler" / "scheduler_config.json", sched, atomic=False)
        fsync_dir(tmp)
    return root
