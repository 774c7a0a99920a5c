"""The cascade: a frozen text encoder and an ordered list of separately trained stages
(a base model, then super-resolution models), sampled text -> base image -> each SR stage.
Saved and loaded as a model directory (:mod:`imagen.models.model_dir`)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from imagen.diffusion.samplers import Generators, Progress, ProgressCallback
from imagen.models.model_dir import (
    check_text_encoder,
    load_stage,
    meta_stage,
    read_index,
    save_model_dir,
)
from imagen.models.sampling import SamplingConfig
from imagen.models.stage import Edit, Stage, StageConfig
from imagen.text.encoders import (
    TextEmbedding,
    TextEncoder,
    TextEncoderConfig,
    check_encoder_matches,
    load_text_encoder,
    load_text_encoder_low_memory,
)
from imagen.utils.lowmem import compute_in_float32
from imagen.utils.system import bf16_supported
from imagen.utils.tensors import load_weights


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
    assembled here; each stage's text-encoder record must match the encoder. A cascade
    loaded with ``low_memory`` (:class:`LowMemory`) holds one part at a time."""

    def __init__(
        self,
        text_encoder: TextEncoder | None,
        stages: list[Stage],
        low_memory: LowMemory | None = None,
    ) -> None:
        super().__init__()
        check_stage_chain([s.config for s in stages])
        if text_encoder is None and low_memory is None:
            raise ValueError("a cascade needs its text encoder")
        for st in stages:
            if st.config.text_encoder and text_encoder is not None:
                check_encoder_matches(st.config.text_encoder, text_encoder)
        self._text_encoder = text_encoder
        self.stages = nn.ModuleList(stages)
        self.low_memory = low_memory

    @property
    def text_encoder(self) -> TextEncoder:
        """The text encoder (loaded again first if a low-memory cascade released it)."""
        if self._text_encoder is None:
            assert self.low_memory is not None
            self._text_encoder = self.low_memory.load_encoder()
        return self._text_encoder

    def encoder_record(self) -> dict[str, Any]:
        """The text encoder's record (name, width, length), without loading it."""
        if self._text_encoder is None and self.low_memory is not None:
            return dict(self.low_memory.encoder_record)
        return self.text_encoder.config()

    def encode(self, texts: list[str]) -> TextEmbedding:
        """Encode captions; a low-memory cascade releases its encoder afterwards (unless
        told to keep it)."""
        emb = self.text_encoder.encode(texts)
        if self.low_memory is not None and not self.low_memory.keep_text_encoder:
            self._text_encoder = None
            gc.collect()
        return emb

    def _stage(self, k: int) -> Stage:
        """Stage k, with its weights in memory."""
        st = self.stages[k]
        if self.low_memory is not None:
            self.low_memory.materialise(st, k)
        return st

    def _done(self, k: int) -> None:
        if self.low_memory is not None:
            self.stages[k].unet.to("meta")  # weights released; loaded again when next needed
            gc.collect()

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str] | TextEmbedding,
        *,
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
            st = self._stage(k)
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
            images = st.sample(
                text,
                images,
                s,
                gen,
                autocast_dtype,
                progress=progress,
                edit=edit,
                negative=neg,
                at=at,
            )
            images = images.clamp(-1, 1)
            self._done(k)
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
            both = self.encode(list(prompts) + negative)
            n = len(prompts)
            return (
                TextEmbedding(both.tokens[:n], both.mask[:n]),
                TextEmbedding(both.tokens[n:], both.mask[n:]),
            )
        text = prompts if isinstance(prompts, TextEmbedding) else self.encode(prompts)
        if isinstance(negative, list):
            negative = self.encode(negative)
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


LOW_MEMORY_BYTES = 2 << 30  # stage weights above this load in low-memory mode by default


@dataclass
class LowMemory:
    """How a cascade larger than memory runs: the text encoder is loaded for encoding and
    released after it (unless ``keep_text_encoder``), and each stage's weights are loaded
    from its directory when it samples and released after, all kept in ``dtype`` (bf16), and
    computed in float32 where the device has no fast bf16 (utils/lowmem.py)."""

    stage_dirs: list[Path]
    encoder_record: dict[str, Any]
    device: torch.device
    dtype: torch.dtype = torch.bfloat16
    keep_text_encoder: bool = False
    # stage k's weights go in through loaders[k] where set (a stage with LoRA adapters:
    # models/lora.py attaches them again each time the stage is loaded)
    loaders: dict[int, Callable[[nn.Module, dict[str, Tensor]], None]] = field(default_factory=dict)

    def _fast_bf16(self) -> bool:
        return self.dtype not in (torch.bfloat16, torch.float16) or bf16_supported(self.device)

    def load_encoder(self) -> TextEncoder:
        return load_text_encoder_low_memory(
            encoder_config(self.encoder_record), self.device, self.dtype
        )

    def materialise(self, stage: Stage, k: int) -> None:
        """Give ``stage`` (built on the meta device) its weights, if it has none now."""
        if not next(stage.unet.parameters()).is_meta:
            return
        state = load_weights(self.stage_dirs[k] / "model.safetensors", self.dtype)
        if k in self.loaders:
            self.loaders[k](stage.unet, state)
        else:
            stage.unet.load_state_dict(state, strict=True, assign=True)
        stage.unet.to(self.device)
        if not self._fast_bf16() and getattr(stage.unet, "compute_dtype", None) is None:
            compute_in_float32(stage.unet)


def weights_bytes(root: Path, index: dict[str, Any]) -> int:
    """The size of a model directory's stage weights."""
    files = [root / s / "model.safetensors" for s in index["stages"]]
    return sum(f.stat().st_size for f in files if f.is_file())  # a missing one: loading says


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
    low_memory: bool | None = None,
    keep_text_encoder: bool = False,
    weights_dtype: torch.dtype = torch.bfloat16,
) -> Cascade:
    """Load a model directory; the text encoder is the one recorded there unless given.
    ``low_memory`` (default: when the stage weights exceed 2 GiB, as DeepFloyd IF's do) loads
    nothing up front and one part at a time when sampling, with weights in ``weights_dtype``
    (see :class:`LowMemory`)."""
    root = Path(directory)
    index = read_index(root)
    te = check_text_encoder(index["text_encoder"], root)
    if low_memory is None:
        low_memory = weights_bytes(root, index) > LOW_MEMORY_BYTES
    if low_memory:
        dirs = [root / name for name in index["stages"]]
        lm = LowMemory(dirs, te, torch.device(device), weights_dtype, keep_text_encoder)
        return Cascade(text_encoder, [meta_stage(d) for d in dirs], lm)
    if text_encoder is None:
        text_encoder = load_text_encoder(encoder_config(te), device, text_dtype)
    stages = [load_stage(root / name, device) for name in index["stages"]]
    return Cascade(text_encoder, stages)
