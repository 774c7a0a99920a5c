"""Sampling for users: prompts in, PIL images out (:class:`ImagenPipeline`)."""

from imagen.diffusion.samplers import Cancelled, Progress, ProgressCallback
from imagen.models.sampling import SamplingOverrides, sampling_summary
from imagen.pipeline.hub import BUNDLED_MODEL, push_model, resolve_model
from imagen.pipeline.pipeline import (
    CompileFallback,
    ImagenPipeline,
    PipelineOutput,
    compile_unets,
)

__all__ = [
    "BUNDLED_MODEL",
    "Cancelled",
    "CompileFallback",
    "ImagenPipeline",
    "PipelineOutput",
    "Progress",
    "ProgressCallback",
    "SamplingOverrides",
    "compile_unets",
    "push_model",
    "resolve_model",
    "sampling_summary",
]
