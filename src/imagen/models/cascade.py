"""The cascade: frozen text encoders and an ordered list of separately trained stages
(a base model, then super-resolution models), sampled text -> base image -> each SR stage.
Saved and loaded as a model directory (:mod:`imagen.models.model_dir`)."""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from imagen.diffusion.samplers import Generators, Progress, ProgressCallback
from imagen.models.model_dir import (
    check_text_encoder,
    load_space,
    load_stage,
    meta_stage,
    read_index,
    read_stage_config,
    save_model_dir,
)
from imagen.models.sampling import SamplingConfig
from imagen.models.stage import Edit, Stage
from imagen.models.stage_config import StageConfig
from imagen.models.text_encoders import StageEncoders, encoder_config, encoder_key
from imagen.text.encoders import (
    TextEmbedding,
    TextEncoder,
    load_text_encoder,
    load_text_encoder_low_memory,
)
from imagen.utils.lowmem import compute_in_float32
from imagen.utils.system import bf16_supported
from imagen.utils.tensors import load_weights


def check_stage_chain(configs: list[StageConfig]) -> None:
    """Each SR stage upsamples the stage below it. A cascade starts with a base stage, or, for
    a model that only upscales (the x4 upscaler imported alone), with a super-resolution one."""
    if not configs:
        raise ValueError("a cascade needs at least one stage")
    for i, (lo, hi) in enumerate(zip(configs[:-1], configs[1:], strict=True), start=1):
        if not hi.is_super_resolution:
            raise ValueError(
                f"stage {i} is a base stage (it takes no low-res image); only the first stage "
                f"of a cascade may be one, the others must be super-resolution stages"
            )
        if hi.lowres_size != lo.resolution:
            raise ValueError(
                f"stage {i} upsamples from {hi.lowres_size} px but stage {i - 1} "
                f"makes {lo.resolution} px images"
            )


def stage_generators(seeds: list[int]) -> list[torch.Generator]:
    """One fresh CPU generator per image, seeded with its seed (each stage gets its own)."""
    return [torch.Generator().manual_seed(s) for s in seeds]


Embeddings = dict[str, TextEmbedding]
"""Prompts encoded by each text encoder of a cascade, by encoder key (models/text_encoders.py)."""
Prompts = list[str] | TextEmbedding | Embeddings


class Cascade(nn.Module):
    """Text encoders and stages, base first. Stages are trained independently and assembled
    here; each stage reads the text encoder its record names: one encoder for all, or the
    loaded encoders by key (:func:`~imagen.models.text_encoders.encoder_key` of a record). A
    cascade loaded with ``low_memory`` (:class:`LowMemory`) holds one part at a time."""

    def __init__(
        self,
        text_encoder: TextEncoder | Mapping[str, TextEncoder] | None,
        stages: list[Stage],
        low_memory: LowMemory | None = None,
    ) -> None:
        super().__init__()
        check_stage_chain([s.config for s in stages])
        records = [dict(st.config.text_encoder) for st in stages]
        if text_encoder is not None:
            self.encoders = StageEncoders(records, given=text_encoder)
        elif low_memory is not None:
            self.encoders = StageEncoders(
                records, loader=low_memory.load_encoder, keep=low_memory.keep_text_encoder
            )
        else:
            raise ValueError("a cascade needs its text encoder")
        self.stages = nn.ModuleList(stages)
        self.low_memory = low_memory

    @property
    def text_encoder(self) -> TextEncoder:
        """The first stage's text encoder (loaded again first if a low-memory cascade released
        it); :attr:`encoders` holds every stage's."""
        return self.encoders.get(self.encoders.keys[0])

    def encoder_record(self, k: int = 0) -> dict[str, Any]:
        """Stage ``k``'s text encoder record (name, width, length), without loading it."""
        return dict(self.encoders.records[self.encoders.keys[k]])

    def encode(self, texts: list[str], stages: range | None = None) -> Embeddings:
        """Encode captions once with each text encoder of ``stages`` (all by default); a
        low-memory cascade releases each encoder afterwards (unless told to keep it)."""
        run = stages if stages is not None else range(len(self.stages))
        return self.encoders.encode(texts, [self.encoders.keys[k] for k in run])

    def first_stages(self, k: int) -> Cascade:
        """The cascade of the first ``k`` stages, sharing these modules and encoders."""
        part = Cascade.__new__(Cascade)
        nn.Module.__init__(part)
        part.encoders, part.low_memory = self.encoders, self.low_memory
        part.stages = nn.ModuleList(list(self.stages)[:k])
        return part

    def _stage(self, k: int) -> Stage:
        """Stage k, with its weights in memory."""
        st = self.stages[k]
        if self.low_memory is not None:
            self.low_memory.materialise(st, k)
        return st

    def _done(self, k: int) -> None:
        if self.low_memory is not None:
            self.low_memory.release(self.stages[k])

    @torch.no_grad()
    def sample(
        self,
        prompts: Prompts,
        *,
        sampling: list[SamplingConfig] | None = None,
        generator: Generators = None,
        autocast_dtype: torch.dtype | None = None,
        return_all_stages: bool = False,
        progress: ProgressCallback | None = None,
        edit: Edit | None = None,
        negative: Prompts | None = None,
        start_stage: int = 0,
        lowres: Tensor | None = None,
        seeds: list[int] | None = None,
    ) -> list[Tensor]:
        """Run the cascade for ``prompts`` (or their embeddings: one TextEmbedding when every
        stage reads one encoder, else one per encoder key), one image each; returns each
        stage's images in [-1, 1] (only the last unless ``return_all_stages``).

        ``sampling`` has one config per stage (the stages' defaults if None). ``progress``
        gets a :class:`~imagen.diffusion.samplers.Progress` after every denoiser step; if it
        returns False, :class:`~imagen.diffusion.samplers.Cancelled` is raised. ``edit``
        applies image-to-image or inpainting at every stage; ``negative`` (one prompt per
        image) is what guidance pushes away from instead of the null caption. With
        ``start_stage`` k the cascade starts at super-resolution stage k from the images
        ``lowres`` (upscaling). With ``seeds`` (one per image, instead of ``generator``) every
        stage draws from fresh CPU generators seeded with them, as DeepFloyd IF's pipelines do:
        a stage's images then depend only on its input and the seeds, on any device, so
        upscaling an image reproduces the cascade's own super-resolution of it."""
        run = self._check_run(start_stage, lowres)
        text, neg = self._encode(prompts, negative, run)
        outs: list[Tensor] = []
        images = lowres
        b = next(iter(text.values())).tokens.shape[0]
        for k in run:
            st = self._stage(k)
            s = sampling[k] if sampling is not None else st.config.sampling
            at = Progress(k - run.start, len(run), 0, s.steps, batch_size=b, images_total=b)
            gen = generator if seeds is None else stage_generators(seeds)
            key = self.encoders.keys[k]
            images = st.sample(
                text[key],
                images,
                s,
                gen,
                autocast_dtype,
                progress=progress,
                edit=edit,
                negative=None if neg is None else neg[key],
                at=at,
            )
            images = images.clamp(-1, 1)
            self._done(k)
            outs.append(images)
        return outs if return_all_stages else outs[-1:]

    def _check_run(self, start_stage: int, lowres: Tensor | None) -> range:
        if not 0 <= start_stage < len(self.stages):
            raise ValueError(
                f"start_stage {start_stage}: the cascade has {len(self.stages)} stages"
            )
        needs = self.stages[start_stage].config.is_super_resolution
        if needs and lowres is None:
            raise ValueError(
                "this model only upscales (its first stage is a super-resolution stage): give "
                "it images (imagen upscale, ImagenPipeline.upscale)"
                if start_stage == 0
                else "give low-res images exactly when starting after the base stage"
            )
        if not needs and lowres is not None:
            raise ValueError("give low-res images exactly when starting after the base stage")
        return range(start_stage, len(self.stages))

    def _embeddings(self, given: Prompts, run: range, what: str) -> Embeddings:
        """Embeddings of ``given`` for the encoders of ``run``."""
        if isinstance(given, dict):
            return given
        if isinstance(given, TextEmbedding):
            keys = {self.encoders.keys[k] for k in run}
            if len(keys) != 1:
                raise ValueError(f"the stages read {len(keys)} text encoders: give {what} as text")
            return {keys.pop(): given}
        return self.encode(list(given), run)

    def _encode(
        self, prompts: Prompts, negative: Prompts | None, run: range
    ) -> tuple[Embeddings, Embeddings | None]:
        """The prompts' and the negative prompts' embeddings (encoded together when both are
        text, so they share one padded length)."""
        if isinstance(negative, list) and isinstance(prompts, list):
            if len(negative) != len(prompts):
                raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
            n = len(prompts)
            both = self.encode(list(prompts) + negative, run)
            text = {k: TextEmbedding(e.tokens[:n], e.mask[:n]) for k, e in both.items()}
            return text, {k: TextEmbedding(e.tokens[n:], e.mask[n:]) for k, e in both.items()}
        text = self._embeddings(prompts, run, "prompts")
        neg = None if negative is None else self._embeddings(negative, run, "negative prompts")
        b = next(iter(text.values())).tokens.shape[0]
        if neg is not None and next(iter(neg.values())).tokens.shape[0] != b:
            raise ValueError(
                f"{next(iter(neg.values())).tokens.shape[0]} negative prompts for {b} prompts"
            )
        return text, neg

    # ---- model directories -------------------------------------------------------------
    def save(self, directory: str | Path, dtype: torch.dtype | None = torch.float16) -> None:
        """Write the cascade as a model directory (weights in safetensors, fp16 by default)."""
        save_model_dir(
            directory,
            [self.encoder_record(k) for k in range(len(self.stages))],
            [s.config for s in self.stages],
            [s.unet.state_dict() for s in self.stages],
            dtype,
            null_texts=[s.null_text for s in self.stages],
            spaces=[_space_state(s) for s in self.stages],
        )


def _space_state(stage: Stage) -> dict[str, Tensor] | None:
    module = stage.space.weights()
    return None if module is None else module.state_dict()


LOW_MEMORY_BYTES = 2 << 30  # stage weights above this load in low-memory mode by default


@dataclass
class LowMemory:
    """How a cascade larger than memory runs: each text encoder is loaded for encoding and
    released after it (unless ``keep_text_encoder``), and each stage's weights are loaded
    from its directory when it samples and released after, all kept in ``dtype`` (bf16), and
    computed in float32 where the device has no fast bf16 (utils/lowmem.py). A latent stage's
    VAE is kept in float32."""

    stage_dirs: list[Path]
    device: torch.device
    dtype: torch.dtype = torch.bfloat16
    keep_text_encoder: bool = False
    # stage k's weights go in through loaders[k] where set (a stage with LoRA adapters:
    # models/lora.py attaches them again each time the stage is loaded)
    loaders: dict[int, Callable[[nn.Module, dict[str, Tensor]], None]] = field(default_factory=dict)

    def _fast_bf16(self) -> bool:
        return self.dtype not in (torch.bfloat16, torch.float16) or bf16_supported(self.device)

    def load_encoder(self, record: dict[str, Any]) -> TextEncoder:
        return load_text_encoder_low_memory(encoder_config(record), self.device, self.dtype)

    def materialise(self, stage: Stage, k: int) -> None:
        """Give ``stage`` (built on the meta device) its weights, if it has none now."""
        if not next(stage.unet.parameters()).is_meta:
            return
        state = load_weights(self.stage_dirs[k] / "model.safetensors", self.dtype)
        if k in self.loaders:
            self.loaders[k](stage.unet, state)
        else:
            stage.unet.load_state_dict(state, strict=True, assign=True)
        load_space(stage, self.stage_dirs[k], assign=True)
        stage.to(self.device)
        # bf16 weights compute in bf16 only in a network that casts its inputs to its weights'
        # dtype (diffusers' U-Net), on a device with fast bf16; elsewhere in float32
        native = self._fast_bf16() and getattr(stage.unet, "casts_inputs", False)
        if not native and getattr(stage.unet, "compute_dtype", None) is None:
            compute_in_float32(stage.unet)

    def release(self, stage: Stage) -> None:
        """Drop a stage's weights (loaded again when it next samples)."""
        stage.to("meta")
        gc.collect()


def weights_bytes(root: Path, index: dict[str, Any]) -> int:
    """The size of a model directory's stage weights."""
    files = [root / s / "model.safetensors" for s in index["stages"]]
    return sum(f.stat().st_size for f in files if f.is_file())  # a missing one: loading says


def stage_encoder_records(root: Path, index: dict[str, Any]) -> list[dict[str, Any]]:
    """Each stage's text-encoder record (the index's where a stage has none), every local
    encoder path checked to exist from here."""
    records = []
    for name in index["stages"]:
        record = read_stage_config(root / name).text_encoder or index["text_encoder"]
        records.append(check_text_encoder(record, root))
    return records


def load_cascade(
    directory: str | Path,
    device: str | torch.device = "cpu",
    text_encoder: TextEncoder | None = None,
    text_dtype: torch.dtype | None = None,
    low_memory: bool | None = None,
    keep_text_encoder: bool = False,
    weights_dtype: torch.dtype = torch.bfloat16,
) -> Cascade:
    """Load a model directory; each stage reads the text encoder its record names (loaded once
    per distinct record) unless one is given for all. ``low_memory`` (default: when the stage
    weights exceed 2 GiB, as DeepFloyd IF's do) loads nothing up front and one part at a time
    when sampling, with weights in ``weights_dtype`` (see :class:`LowMemory`)."""
    root = Path(directory)
    index = read_index(root)
    check_text_encoder(index["text_encoder"], root)
    if low_memory is None:
        low_memory = weights_bytes(root, index) > LOW_MEMORY_BYTES
    dirs = [root / name for name in index["stages"]]
    records = stage_encoder_records(root, index)
    build = meta_stage if low_memory else functools.partial(load_stage, device=device)
    stages = [build(d) for d in dirs]
    for st, r in zip(stages, records, strict=True):
        st.config.text_encoder = r
    if low_memory:
        lm = LowMemory(dirs, torch.device(device), weights_dtype, keep_text_encoder)
        return Cascade(text_encoder, stages, lm)
    if text_encoder is not None:
        return Cascade(text_encoder, stages)
    loaded: dict[str, TextEncoder] = {}
    for r in records:
        key = encoder_key(r)
        if key not in loaded:
            loaded[key] = load_text_encoder(encoder_config(r), device, text_dtype)
    return Cascade(loaded, stages)
