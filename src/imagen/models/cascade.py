"""The cascade: a frozen text encoder and an ordered list of separately trained stages
(a base model, then super-resolution models), sampled text -> base image -> each SR stage.
Saved and loaded as a model directory (:mod:`imagen.models.model_dir`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from imagen.diffusion.samplers import Generators, Progress, ProgressCallback
from imagen.models.model_dir import check_text_encoder, load_stage, read_index, save_model_dir
from imagen.models.stage import Edit, SamplingConfig, Stage, StageConfig
from imagen.text.encoders import (
    TextEmbedding,
    TextEncoder,
    TextEncoderConfig,
    check_encoder_matches,
    load_text_encoder,
)


def check_stage_chain(configs: list[StageConfig]) -> None:
    """A cascade starts with a base stage and each SR stage upsamples the stage below it."""
    if not configs:
        raise ValueError("a cascade needs at least one stage")
    if configs[0].is_super_resolution:
        raise ValueError("the first stage of a cascade must be a base (non-SR) stage")
    for i, (lo, hi) in enumerate(zip(configs[:-1], configs[1:], strict=True), start=1):
        if hi.lowres_size != lo.resolution:
            raise ValueError(
                f"stage {i} upsamples from {hi.lowres_size} px but stage {i - 1} "
                f"makes {lo.resolution} px images"
            )


def stage_generators(seeds: list[int]) -> list[torch.Generator]:
    """One fresh CPU generator per image, seeded with its seed (each stage gets its own)."""
    return [torch.Generator().manual_seed(s) for s in seeds]


class Cascade(nn.Module):
    """A text encoder and its stages, base first. Stages are trained independently and
    assembled here; each stage's text-encoder record must match the encoder."""

    def __init__(self, text_encoder: TextEncoder, stages: list[Stage]) -> None:
        super().__init__()
        check_stage_chain([s.config for s in stages])
        for st in stages:
            if st.config.text_encoder:
                check_encoder_matches(st.config.text_encoder, text_encoder)
        self.text_encoder = text_encoder
        self.stages = nn.ModuleList(stages)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str] | TextEmbedding,
        sampling: list[SamplingConfig] | None = None,
        generator: Generators = None,
        autocast_dtype: torch.dtype | None = None,
        return_all_stages: bool = False,
        progress: ProgressCallback | None = None,
        edit: Edit | None = None,
        negative: list[str] | TextEmbedding | None = None,
        start_stage: int = 0,
        lowres: Tensor | None = None,
        seeds: list[int] | None = None,
    ) -> list[Tensor]:
        """Run the cascade for ``prompts`` (or their embeddings), one image each; returns each
        stage's images in [-1, 1] (only the last unless ``return_all_stages``).

        ``sampling`` has one config per stage (the stages' defaults if None). ``progress``
        gets a :class:`~imagen.diffusion.samplers.Progress` after every denoiser step; if it
        returns False, :class:`~imagen.diffusion.samplers.Cancelled` is raised. ``edit``
        applies image-to-image or inpainting at every stage; ``negative`` (one prompt per
        image) is what guidance pushes away from instead of the null caption. With
        ``start_stage`` k > 0 the cascade starts at super-resolution stage k from the images
        ``lowres`` (upscaling). With ``seeds`` (one per image, instead of ``generator``) every
        stage draws from fresh CPU generators seeded with them, as DeepFloyd IF's pipelines do:
        a stage's images then depend only on its input and the seeds, on any device, so
        upscaling an image reproduces the cascade's own super-resolution of it."""
        if not 0 <= start_stage < len(self.stages):
            raise ValueError(
                f"start_stage {start_stage}: the cascade has {len(self.stages)} stages"
            )
        if (start_stage > 0) != (lowres is not None):
            raise ValueError("give low-res images exactly when starting after the base stage")
        text, neg = self._encode(prompts, negative)
        outs: list[Tensor] = []
        images = lowres
        b = text.tokens.shape[0]
        run = range(start_stage, len(self.stages))
        for k in run:
            st = self.stages[k]
            s = sampling[k] if sampling is not None else st.config.sampling
            at = Progress(
                stage=k - start_stage,
                stages=len(run),
                step=0,
                steps=s.steps,
                batch_size=b,
                images_total=b,
            )
            gen = generator if seeds is None else stage_generators(seeds)
            images = st.sample(text, images, s, gen, autocast_dtype, progress, edit, neg, at).clamp(
                -1, 1
            )
            outs.append(images)
        return outs if return_all_stages else outs[-1:]

    def _encode(
        self, prompts: list[str] | TextEmbedding, negative: list[str] | TextEmbedding | None
    ) -> tuple[TextEmbedding, TextEmbedding | None]:
        """The prompts' and the negative prompts' embeddings (encoded together when both are
        text, so they share one padded length)."""
        if isinstance(negative, list) and not isinstance(prompts, TextEmbedding):
            if len(negative) != len(prompts):
                raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
            both = self.text_encoder.encode(list(prompts) + negative)
            n = len(prompts)
            return (
                TextEmbedding(both.tokens[:n], both.mask[:n]),
                TextEmbedding(both.tokens[n:], both.mask[n:]),
            )
        text = prompts if isinstance(prompts, TextEmbedding) else self.text_encoder.encode(prompts)
        if isinstance(negative, list):
            negative = self.text_encoder.encode(negative)
        if negative is not None and negative.tokens.shape[0] != text.tokens.shape[0]:
            raise ValueError(
                f"{negative.tokens.shape[0]} negative prompts for {text.tokens.shape[0]} prompts"
            )
        return text, negative

    # ---- model directories -------------------------------------------------------------
    def save(self, directory: str | Path, dtype: torch.dtype | None = torch.float16) -> None:
        """Write the cascade as a model directory (weights in safetensors, fp16 by default)."""
        save_model_dir(
            directory,
            self.text_encoder.config(),
            [s.config for s in self.stages],
            [s.unet.state_dict() for s in self.stages],
            dtype,
            null_texts=[s.null_text for s in self.stages],
        )


def encoder_config(record: dict[str, Any]) -> TextEncoderConfig:
    """The text encoder a model directory's record names (its name, length and padding)."""
    keys = ("padding", "tokenizer", "clean_caption")
    return TextEncoderConfig(
        name=record["name"],
        max_length=int(record["max_length"]),
        **{k: record[k] for k in keys if k in record},
    )


def load_cascade(
    directory: str | Path,
    device: str | torch.device = "cpu",
    text_encoder: TextEncoder | None = None,
    text_dtype: torch.dtype | None = None,
) -> Cascade:
    """Load a model directory; the text encoder is the one recorded there unless given."""
    root = Path(directory)
    index = read_index(root)
    if text_encoder is None:
        te = check_text_encoder(index["text_encoder"], root)
        text_encoder = load_text_encoder(encoder_config(te), device, text_dtype)
    stages = [load_stage(root / name, device) for name in index["stages"]]
    return Cascade(text_encoder, stages)
