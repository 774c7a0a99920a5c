"""``imagen export --format diffusers``: stages of the ``diffusers-unet`` kind (DeepFloyd IF,
imported and possibly fine-tuned here) as diffusers pipeline folders that
``DiffusionPipeline.from_pretrained(DIR)`` loads: ``IFPipeline`` for a base stage,
``IFSuperResolutionPipeline`` for a super-resolution stage.

A folder holds ``model_index.json``, ``unet/`` (diffusers' config record and the weights,
which are diffusers' own names), ``scheduler/`` (a DDPMScheduler with the variance, spacing
and thresholding the stage samples with: a fine-tuned stage's fixed posterior variance is
``variance_type="fixed_small"``), for SR ``image_noising_scheduler/``, and the stage's T5 and
tokenizer (``text_encoder/``, ``tokenizer/``), hard-linked, else symlinked, or copied with
``copy``. ``imagen_export.json`` records the sources and the settings a diffusers call needs to
give the images ``imagen sample --sampler ddpm`` gives (steps, guidance, noise level).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from imagen.models.sampling import SamplingOverrides
from imagen.training.diffusers_format import diffusers_version, model_index, scheduler_config
from imagen.training.export import StageSource, stage_source
from imagen.utils.files import fsync_dir, replacing_directory, write_json
from imagen.utils.tensors import load_weights, save_tensors

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
EXPORT_RECORD = "imagen_export.json"


def _link_tree(source: Path, target: Path, copy: bool) -> None:
    """The files under ``source`` at ``target``: hard links, else symlinks, or copies."""
    for path in sorted(source.rglob("*")):
        dest = target / path.relative_to(source)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        if copy:
            shutil.copyfile(path, dest)
            continue
        try:
            os.link(path.resolve(), dest)
        except OSError:
            os.symlink(path.resolve(), dest)


def _text_parts(record: dict[str, Any]) -> tuple[Path, Path]:
    """The T5 folder and tokenizer folder a stage's encoder record names (IF's, local)."""
    model = Path(str(record.get("name", ""))).expanduser()
    tok = Path(str(record.get("tokenizer") or model)).expanduser()
    if not model.is_dir() or not tok.is_dir():
        raise ValueError(
            f"the text encoder {record.get('name')!r} is not a local T5 folder with a tokenizer: "
            "export to diffusers takes stages of models made by `imagen import`"
        )
    return model, tok


def _weights(source: StageSource) -> dict[str, torch.Tensor]:
    if isinstance(source.weights, dict):
        return source.weights
    return load_weights(Path(source.origin) / "model.safetensors")


def write_pipeline(source: StageSource, out: Path, dtype: torch.dtype, copy: bool) -> None:
    """One diffusers pipeline folder at ``out`` for one stage."""
    cfg = source.config
    if cfg.network != "diffusers-unet":
        raise ValueError(
            f"{source.origin}: its network is {cfg.network!r}; only diffusers-unet (DeepFloyd IF) "
            "stages export to diffusers (a LoRA of another stage exports with --format lora)"
        )
    out.mkdir(parents=True)
    sr = cfg.is_super_resolution
    write_json(out / "model_index.json", model_index(sr), atomic=False)
    (out / "unet").mkdir()
    unet = {"_class_name": "UNet2DConditionModel", "_diffusers_version": diffusers_version()}
    unet.update({k: v for k, v in cfg.unet.config.items() if not k.startswith("_")})
    write_json(out / "unet" / "config.json", unet, atomic=False)
    save_tensors(_weights(source), out / "unet" / UNET_WEIGHTS, dtype)
    (out / "scheduler").mkdir()
    write_json(out / "scheduler" / "scheduler_config.json", scheduler_config(cfg), atomic=False)
    if sr:
        noising = {**scheduler_config(cfg), "variance_type": "fixed_small", "thresholding": False}
        (out / "image_noising_scheduler").mkdir()
        write_json(out / "image_noising_scheduler" / "scheduler_config.json", noising, atomic=False)
    model, tok = _text_parts(source.text_encoder)
    _link_tree(model, out / "text_encoder", copy)
    _link_tree(tok, out / "tokenizer", copy)
    s = cfg.sampling
    call: dict[str, Any] = {"num_inference_steps": s.steps, "guidance_scale": s.guidance}
    if sr:
        call["noise_level"] = round(s.aug_level * (cfg.diffusion.timesteps - 1))
    record = {"source": str(source.origin), "training": source.training, "diffusers_call": call}
    record["imagen_sampling"] = {
        "sampler": "ddpm",
        "spacing": s.spacing,
        "ddpm_variance": s.ddpm_variance,
    }
    write_json(out / EXPORT_RECORD, record, atomic=False)
    fsync_dir(out)


def export_diffusers(
    items: list[str | Path],
    out_dir: str | Path,
    weights: str = "ema",
    dtype: torch.dtype = torch.float16,
    copy: bool = False,
    sampling: SamplingOverrides | None = None,
) -> Path:
    """Write each stage (a training run, a LoRA run merged into its base, or ``MODEL_DIR/stageK``)
    as a diffusers pipeline folder: ``out_dir`` itself for one stage, ``out_dir/stageK`` for
    several. Written beside ``out_dir`` and renamed into place; an existing ``out_dir`` is
    replaced only when it is an earlier export (it holds ``imagen_export.json``). ``sampling``
    changes the stages' settings first, as :func:`~imagen.training.export.export_model` does."""
    if dtype == torch.int8:
        raise ValueError("diffusers pipelines take fp16, bf16 or fp32 weights, not int8")
    sources = [stage_source(item, weights) for item in items]
    if sampling is not None:
        changed = sampling.apply([s.config.sampling for s in sources])
        for src, s in zip(sources, changed, strict=True):
            src.config = replace(src.config, sampling=s)
    root = Path(out_dir)
    earlier = (root / EXPORT_RECORD).is_file() or any(root.glob(f"stage*/{EXPORT_RECORD}"))
    with replacing_directory(root, earlier, "diffusers export") as tmp:
        if len(sources) == 1:
            write_pipeline(sources[0], tmp, dtype, copy)
        else:
            tmp.mkdir(parents=True)
            for k, source in enumerate(sources):
                write_pipeline(source, tmp / f"stage{k}", dtype, copy)
    return root
