"""Sampling settings, the one home of how a stage is sampled: :class:`SamplingConfig` (a
stage's stored defaults), :class:`SamplingOverrides` (what a caller changes, one value for
every stage or one per stage, resolved by :meth:`SamplingOverrides.apply`) and
:func:`sampling_summary` (what a run records). The pipeline, ``imagen export``, ``imagen
train``'s stage changes, the server and the evaluations all resolve settings here."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

import torch

from imagen.diffusion.guidance import ThresholdConfig
from imagen.diffusion.samplers import SAMPLERS, get_sampler
from imagen.diffusion.schedules import check_spacing
from imagen.diffusion.timestep_lists import IF_TIMESTEPS
from imagen.utils.system import bf16_supported

PRECISIONS = ("fp32", "bf16")


@dataclass
class SamplingConfig:
    """How a stage is sampled by default; every field can be overridden per call."""

    sampler: str = "dpmpp"  # a name in imagen.diffusion.samplers.SAMPLERS: ddpm | ddim | dpmpp
    steps: int = 20  # number of denoiser evaluations (respaced timesteps)
    guidance: float = 3.0  # classifier-free guidance scale (1 = no guidance)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    aug_level: float = 0.2  # SR stages: noise-augmentation level of the low-res input, in [0, 1)
    precision: str = "fp32"  # fp32, or bf16 (autocast, where the device supports it)
    eta: float = 0.0  # the ddim sampler's eta option: 0 deterministic, 1 ancestral
    ddpm_variance: str = (
        "posterior"  # the ddpm sampler's variance: posterior, beta or learned_range
    )
    spacing: str = "trailing"  # timesteps: trailing, leading (diffusers' DDPM) or an IF list name
    lambda_min: float | None = None  # clip the noisiest timestep to lambda >= this (IF: -5.1)

    def __post_init__(self) -> None:
        if isinstance(self.threshold, dict):
            self.threshold = ThresholdConfig(**self.threshold)
        get_sampler(self.sampler)  # raises on an unknown name
        for spec in SAMPLERS.values():  # every sampler's options, whichever runs
            for option in spec.options:
                option.check(getattr(self, option.config_field))
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance}")
        if not 0.0 <= self.aug_level < 1.0:
            raise ValueError(f"aug_level must be in [0, 1), got {self.aug_level}")
        check_spacing(self.spacing, self.steps)
        if self.lambda_min is not None and not math.isfinite(self.lambda_min):
            raise ValueError(f"lambda_min must be a finite number, got {self.lambda_min}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype this config asks for on ``device``: bf16 only where it is fast
        there (it falls back to float32 elsewhere), None for float32."""
        if self.precision == "bf16" and bf16_supported(device):
            return torch.bfloat16
        return None

    def sampler_options(self) -> dict[str, Any]:
        """The keyword arguments of this config's sampler (its declared options)."""
        return {o.name: getattr(self, o.config_field) for o in get_sampler(self.sampler).options}


T = TypeVar("T")
PerStage = T | Sequence[T | None] | None
"""None (keep every stage's default), one value for every stage, or one value per stage (None
in the list keeps that stage's default)."""


@dataclass(frozen=True)
class SamplingOverrides:
    """Changes to each stage's default :class:`~imagen.models.stage.SamplingConfig` for one
    call. Every field is None, one value for all stages, or a list with one per stage. The
    values are validated where they land, by SamplingConfig."""

    steps: PerStage[int] = None  # denoiser steps
    guidance: PerStage[float] = None  # classifier-free guidance scale
    sampler: PerStage[str] = None  # a name in imagen.diffusion.samplers.SAMPLERS
    threshold: PerStage[float | str] = None  # a dynamic-thresholding percentile in (0, 1],
    # or a mode: "dynamic" (at the stage's percentile), "static" (clip to [-1, 1]) or "none"
    aug_level: PerStage[float] = None  # SR stages: noise-augmentation level, in [0, 1)
    precision: PerStage[str] = None  # fp32 or bf16 (autocast where the device supports it)
    spacing: PerStage[str] = None  # trailing, leading or a named list (sets steps to its length)

    def __post_init__(self) -> None:
        for f in fields(self):  # lists become tuples: hashable, so requests can be grouped
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))

    def apply(self, defaults: Sequence[SamplingConfig]) -> list[SamplingConfig]:
        """Each stage's config with these overrides applied (and validated)."""
        n = len(defaults)
        per_stage = {f.name: _per_stage(getattr(self, f.name), n, f.name) for f in fields(self)}
        out = []
        for k, s in enumerate(defaults):
            changes = {name: v[k] for name, v in per_stage.items() if v[k] is not None}
            if changes.get("spacing") in IF_TIMESTEPS and "steps" not in changes:
                changes["steps"] = len(IF_TIMESTEPS[changes["spacing"]])
            if "steps" in changes and "spacing" not in changes and s.spacing in IF_TIMESTEPS:
                changes["spacing"] = "trailing"  # other step counts leave a stored named list
            if "threshold" in changes:
                changes["threshold"] = s.threshold.override(changes["threshold"])
            out.append(replace(s, **changes))  # SamplingConfig.__post_init__ validates
        return out


def _per_stage(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(
                f"{name} has {len(value)} values for {n} stages (give one, or one per stage)"
            )
        return list(value)
    return [value] * n


def sampling_summary(configs: Sequence[SamplingConfig]) -> list[dict[str, Any]]:
    """The settings each stage ran with, as JSON-ready dicts: the one record that manifests,
    server responses and evaluation reports carry."""
    return [
        {
            "sampler": c.sampler,
            "steps": c.steps,
            "guidance": c.guidance,
            "threshold": c.threshold.summary(),
            "aug_level": c.aug_level,
            "precision": c.precision,
            "spacing": c.spacing,
            **c.sampler_options(),
        }
        for c in configs
    ]
