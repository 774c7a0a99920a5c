"""diffusers' configuration records of DeepFloyd IF pipeline folders, from a stage's
configuration: the DDPM scheduler that samples as the stage does, and ``model_index.json``.
Used by the diffusers export (training/diffusers_export.py) and beside a LoRA file
(training/lora_export.py)."""

from __future__ import annotations

from typing import Any

from imagen.models.stage_config import StageConfig

VARIANCE_TYPES = {
    "learned_range": "learned_range",
    "posterior": "fixed_small",
    "beta": "fixed_large",
}


def diffusers_version() -> str:
    """The installed diffusers' version (written in the configs, as diffusers does)."""
    import diffusers

    return str(diffusers.__version__)


def scheduler_config(config: StageConfig) -> dict[str, Any]:
    """diffusers' DDPMScheduler config that samples as ``config`` does with the ddpm sampler
    (IF's cosine schedule; the stage's variance, spacing and thresholding)."""
    d, s = config.diffusion, config.sampling
    problems = [
        f"{what} is {got!r}, diffusers' IF scheduler needs {need!r}"
        for what, got, need in (
            ("diffusion.schedule", d.schedule, "cosine"),
            ("diffusion.target", d.target, "eps"),
            ("diffusion.cosine_s", d.cosine_s, 0.008),
        )
        if got != need
    ]
    if problems:
        raise ValueError(f"this stage cannot be a diffusers IF stage: {problems[0]}")
    mode = s.threshold.mode
    return {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": diffusers_version(),
        "beta_end": 0.02,
        "beta_schedule": "squaredcos_cap_v2",
        "beta_start": 0.0001,
        "clip_sample": mode != "none",
        "clip_sample_range": 1.0,
        "dynamic_thresholding_ratio": s.threshold.percentile,
        "num_train_timesteps": d.timesteps,
        "prediction_type": "epsilon",
        "rescale_betas_zero_snr": False,
        "sample_max_value": s.threshold.max_scale or 1.0,
        "steps_offset": 0,
        "thresholding": mode == "dynamic",
        "timestep_spacing": "leading" if s.spacing == "leading" else "trailing",
        "trained_betas": None,
        "variance_type": VARIANCE_TYPES[s.ddpm_variance],
    }


def model_index(sr: bool) -> dict[str, Any]:
    """``model_index.json`` of an IF pipeline folder (no safety checker or watermarker)."""
    parts: dict[str, Any] = {
        "_class_name": "IFSuperResolutionPipeline" if sr else "IFPipeline",
        "_diffusers_version": diffusers_version(),
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "watermarker": [None, None],
    }
    if sr:
        parts["image_noising_scheduler"] = ["diffusers", "DDPMScheduler"]
    return dict(sorted(parts.items()))
