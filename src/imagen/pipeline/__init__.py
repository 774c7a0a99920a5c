"""Sampling for users: prompts in, PIL images out (:class:`ImagenPipeline`)."""

from imagen.pipeline.pipeline import (
    BUNDLED_MODEL,
    CompileFallback,
    ImagenPipeline,
    PipelineOutput,
    compile_unets,
)

__all__ = ["BUNDLED_MODEL", "CompileFallback", "ImagenPipeline", "PipelineOutput", "compile_unets"]
