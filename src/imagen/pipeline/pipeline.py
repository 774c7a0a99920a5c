"""The Python pipeline: prompts in, PIL images out.

from imagen import ImagenPipeline
pipe = ImagenPipeline.from_pretrained()          # the bundled Shapes cascade
out = pipe(["a red circle on the left"], guidance=3.0, steps=20, seed=0)
out.images[0].save("circle.png")
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from imagen.data.shapes import pil_to_tensor, tensor_to_pil
from imagen.models.cascade import Cascade, load_cascade
from imagen.models.stage import Edit, SamplingConfig
from imagen.text.encoders import TextEmbedding
from imagen.utils.compile import CompileFallback

BUNDLED_MODEL = Path(__file__).parents[1] / "weights" / "shapes-cascade"

PerStage = Any  # a value for every stage, or a list with one value per stage
log = logging.getLogger(__name__)


def compile_unets(cascade: Cascade, stages: list[int] | None = None) -> None:
    """Use torch.compile for the U-Nets of ``stages`` (all by default), with eager fallback."""
    for k, st in enumerate(cascade.stages):
        if stages is None or k in stages:
            st.compiled = CompileFallback(st.unet)


@dataclass
class PipelineOutput:
    images: list[Image.Image]  # the final stage's images, prompt-major
    prompts: list[str]  # the prompt of each image
    seeds: list[int]  # the seed of each image (regenerates it alone with num_images=1)
    stages: list[list[Image.Image]] = field(default_factory=list)  # every stage, on request


def _per_stage(value: PerStage, n: int, name: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values but the cascade has {n} stages")
        return list(value)
    return [value] * n


class ImagenPipeline:
    """Sampling from a cascade with per-call settings, batching and per-image seeds."""

    def __init__(
        self, cascade: Cascade, autocast_dtype: torch.dtype | None = None, compile: bool = False
    ) -> None:
        self.cascade = cascade.eval()
        self.autocast_dtype = autocast_dtype
        if compile:
            compile_unets(cascade)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        compile: bool = False,
    ) -> ImagenPipeline:
        """Load a model directory (the bundled Shapes cascade when ``path`` is None); ``dtype``
        (for example torch.bfloat16) runs the U-Nets under autocast; ``compile`` uses
        torch.compile where it works."""
        return cls(load_cascade(path or BUNDLED_MODEL, device), dtype, compile)

    @property
    def num_stages(self) -> int:
        return len(self.cascade.stages)

    def sampling_configs(
        self,
        steps: PerStage = None,
        guidance: PerStage = None,
        sampler: PerStage = None,
        threshold_percentile: PerStage = None,
        aug_level: PerStage = None,
    ) -> list[SamplingConfig]:
        """Each stage's default sampling settings with the given overrides (None keeps it)."""
        n = self.num_stages
        out = []
        for k, st in enumerate(self.cascade.stages):
            s = st.config.sampling
            changes: dict[str, Any] = {}
            for name, value in (
                ("steps", steps),
                ("guidance", guidance),
                ("sampler", sampler),
                ("aug_level", aug_level),
            ):
                v = _per_stage(value, n, name)[k]
                if v is not None:
                    changes[name] = v
            p = _per_stage(threshold_percentile, n, "threshold_percentile")[k]
            if p is not None:
                changes["threshold"] = replace(s.threshold, percentile=p)
            out.append(replace(s, **changes))  # __post_init__ validates
        return out

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | Sequence[str],
        num_images_per_prompt: int = 1,
        steps: PerStage = None,
        guidance: PerStage = None,
        sampler: PerStage = None,
        threshold_percentile: PerStage = None,
        aug_level: PerStage = None,
        seed: int = 0,
        batch_size: int = 16,
        return_all_stages: bool = False,
        init_image: Image.Image | None = None,
        strength: float = 1.0,
        mask: Image.Image | None = None,
        progress: Callable[[int, int, int, int], None] | None = None,
    ) -> PipelineOutput:
        """Generate ``num_images_per_prompt`` images for each prompt. Image j (counting over all
        prompts) uses seed ``seed + j``, so it is reproducible alone. ``init_image`` with
        ``strength`` < 1 is image-to-image; with ``mask`` (white = regenerate) inpainting.
        ``progress(batch_start, stage, step, steps)`` reports every denoiser step."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if num_images_per_prompt < 1:
            raise ValueError("num_images_per_prompt must be >= 1")
        all_prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        seeds = [seed + j for j in range(len(all_prompts))]
        sampling = self.sampling_configs(steps, guidance, sampler, threshold_percentile, aug_level)
        edit = self._edit(init_image, strength, mask)
        return self.generate(
            all_prompts, seeds, sampling, batch_size, return_all_stages, edit, progress
        )

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        sampling: list[SamplingConfig] | None = None,
        batch_size: int = 16,
        return_all_stages: bool = False,
        edit: Edit | None = None,
        progress: Callable[[int, int, int, int], None] | None = None,
    ) -> PipelineOutput:
        """One image per (prompt, seed) pair, ``batch_size`` at a time; each distinct prompt is
        encoded once. The lower-level entry point of :meth:`__call__` and the server."""
        if not prompts:
            raise ValueError("no prompts given")
        if len(seeds) != len(prompts) or batch_size < 1:
            raise ValueError("give one seed per prompt and a batch_size >= 1")
        sampling = sampling or self.sampling_configs()
        unique = list(dict.fromkeys(prompts))
        text = self.cascade.text_encoder.encode(unique)
        row = {p: i for i, p in enumerate(unique)}
        device = self.cascade.stages[0].device
        per_stage: list[list[Image.Image]] = [[] for _ in range(self.num_stages)]
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            idx = torch.tensor([row[p] for p in chunk], device=text.mask.device)
            emb = TextEmbedding(text.tokens[idx], text.mask[idx])
            gens = [
                torch.Generator(device=device).manual_seed(s)
                for s in seeds[start : start + len(chunk)]
            ]

            def cb(k: int, i: int, n: int, start: int = start) -> None:
                if progress is not None:
                    progress(start, k, i, n)

            outs = self.cascade.sample(emb, sampling, gens, self.autocast_dtype, True, cb, edit)
            for k, imgs in enumerate(outs):
                per_stage[k].extend(tensor_to_pil(x) for x in imgs.cpu())
        return PipelineOutput(
            per_stage[-1], list(prompts), list(seeds), per_stage if return_all_stages else []
        )

    @staticmethod
    def _edit(
        init_image: Image.Image | None, strength: float, mask: Image.Image | None
    ) -> Edit | None:
        if init_image is None:
            if mask is not None:
                raise ValueError("a mask needs an init image to inpaint")
            return None
        image = pil_to_tensor(init_image)[None]
        m = None
        if mask is not None:
            m = (pil_to_tensor(mask.convert("L").convert("RGB"))[:1][None] + 1) / 2
        return Edit(image, strength, m)
