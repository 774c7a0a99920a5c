"""Per-call sampling settings: :class:`SamplingOverrides` (what a caller changes) and
:func:`sampling_summary` (what a run records), shared by the pipeline, the command line, the
server and the evaluations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

from imagen.diffusion.timestep_lists import IF_TIMESTEPS
from imagen.models.stage import SamplingConfig

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
            raise ValueError(f"{name} has {len(value)} values but the cascade has {n} stages")
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
