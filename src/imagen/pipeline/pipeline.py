"""The Python pipeline: prompts in, PIL images out.

from imagen import ImagenPipeline
pipe = ImagenPipeline.from_pretrained()          # the bundled Shapes cascade
out = pipe(["a red circle on the left"], guidance=3.0, steps=20, seed=0)
out.images[0].save("circle.png")
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from imagen.diffusion.samplers import ProgressCallback
from imagen.diffusion.schedules import check_spacing
from imagen.models.cascade import LOW_MEMORY_BYTES, Cascade, Embeddings, load_cascade
from imagen.models.lora_spec import LoraSpec
from imagen.models.lowres import resize
from imagen.models.model_dir import read_index
from imagen.models.sampling import PerStage, SamplingConfig, SamplingOverrides
from imagen.models.stage import Edit
from imagen.pipeline.hub import resolve_model
from imagen.text.encoders import TextEmbedding
from imagen.text.vocabulary import unknown_words
from imagen.utils.compile import CompileFallback
from imagen.utils.pil import pil_to_tensor, tensor_to_pil

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
    sampling: list[SamplingConfig] = field(default_factory=list)  # each stage run: its settings
    negative_prompts: list[str] = field(default_factory=list)  # per image; empty if none
    warnings: list[str] = field(default_factory=list)  # e.g. words the model never saw
    # per image, short: its prompt's unknown words, then what applied to the whole call (a
    # precision fallback, low-memory mode chosen for the model); what a manifest row records
    image_warnings: list[list[str]] = field(default_factory=list)


@dataclass
class _Batches:
    """What one sampling call runs, image by image, before it is cut into batches."""

    prompts: list[str]
    seeds: list[int]
    negatives: list[str] | None  # None: the null caption for every image
    lowres: Tensor | None = None  # (N, C, H, W) upscaling inputs, one per image


def _one_per_image(value: str | Sequence[str] | None, n: int, name: str) -> list[str] | None:
    if value is None or isinstance(value, str):
        return None if not (value or "").strip() else [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{len(values)} {name}s for {n} images")
    return values if any(v.strip() for v in values) else None


class ImagenPipeline:
    """Sampling from a cascade with per-call settings, batching and per-image seeds."""

    def __init__(
        self,
        cascade: Cascade,
        autocast_dtype: torch.dtype | None = None,
        compile: bool = False,
        vocabulary: list[str] | None = None,
    ) -> None:
        self.cascade = cascade.eval()
        self.autocast_dtype = autocast_dtype
        # the words of the model's training captions (None: unknown, as for imported models)
        self.vocabulary = None if vocabulary is None else frozenset(vocabulary)
        self._warned: set[str] = set()
        # what applies to every image of this pipeline (short form; logged when it arose)
        self.notes: list[str] = []
        self._logged: set[str] = set()
        self.loras: list[dict] = []  # the LoRA files applied: path, stage, scale, rank
        if compile:
            compile_unets(cascade)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        compile: bool = False,
        low_memory: bool | None = None,
        lora: Sequence[LoraSpec | str | tuple] = (),
        fuse_lora: bool = False,
    ) -> ImagenPipeline:
        """Load a model: a model directory, a Hugging Face Hub repo id (``ORG/NAME``, from the
        local cache when offline) or, when ``path`` is None, the bundled Shapes cascade.
        ``dtype`` (for example torch.bfloat16) runs the U-Nets under autocast; ``compile`` uses
        torch.compile where it works. ``low_memory`` (default: for models whose weights pass
        2 GiB, such as DeepFloyd IF) holds one part of the cascade in memory at a time, in
        bf16 (see :class:`~imagen.models.cascade.LowMemory`). ``lora`` applies LoRA files
        (``PATH[:SCALE][@STAGE]`` strings, :class:`~imagen.models.lora_spec.LoraSpec` or
        (path, scale, stage) tuples; see :func:`~imagen.models.lora.apply_loras`), merged
        into the weights with ``fuse_lora``."""
        root = resolve_model(path)
        vocab = read_index(root).get("vocabulary")
        cascade = load_model(root, device, low_memory)
        records = []
        if lora:  # LoRA adapters (models/lora.py); before compiling
            from imagen.models.lora import apply_loras

            records = apply_loras(cascade, list(lora), fuse_lora)
        pipe = cls(cascade, dtype, compile, vocab if isinstance(vocab, list) else None)
        pipe.loras = records
        if low_memory is None and cascade.low_memory is not None:
            pipe.note(
                "low-memory mode: weights in bf16",
                f"{root.name}: its weights pass {LOW_MEMORY_BYTES >> 30} GiB, so it runs in "
                "low-memory mode: one part of the cascade in memory at a time, weights in bf16 "
                "(--no-low-memory, or low_memory=False, holds it all at its stored precision)",
            )
        return pipe

    @property
    def num_stages(self) -> int:
        return len(self.cascade.stages)

    def sampling_configs(self, overrides: SamplingOverrides | None = None) -> list[SamplingConfig]:
        """Each stage's default sampling settings with ``overrides`` applied and validated (the
        pipeline's ``dtype``, when given, sets every stage's precision)."""
        defaults = [st.config.sampling for st in self.cascade.stages]
        overrides = overrides or SamplingOverrides()
        if self.autocast_dtype is not None and overrides.precision is None:
            forced = "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32"
            overrides = replace(overrides, precision=forced)
        configs = overrides.apply(defaults)
        for k, (st, c) in enumerate(zip(self.cascade.stages, configs, strict=True)):
            try:  # the steps and the spacing against the stage's own schedule, before any work
                check_spacing(c.spacing, c.steps, st.config.diffusion.timesteps)
            except ValueError as e:
                raise ValueError(f"stage {k}: {e}") from None
        return configs

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | Sequence[str],
        num_images_per_prompt: int = 1,
        steps: PerStage[int] = None,
        guidance: PerStage[float] = None,
        sampler: PerStage[str] = None,
        threshold_percentile: PerStage[float] = None,
        aug_level: PerStage[float] = None,
        seed: int = 0,
        batch_size: int = 16,
        return_all_stages: bool = False,
        init_image: Image.Image | None = None,
        strength: float = 1.0,
        mask: Image.Image | None = None,
        progress: ProgressCallback | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        overrides: SamplingOverrides | None = None,
    ) -> PipelineOutput:
        """Generate ``num_images_per_prompt`` images for each prompt. Image j (counting over all
        prompts) uses seed ``seed + j``, so it is reproducible alone.

        ``steps`` ... ``aug_level`` change the stages' sampling settings (each one value or one
        per stage; they win over the same fields of ``overrides``). ``negative_prompt`` (one
        for all prompts or one per prompt) is what guidance steers away from. ``init_image``
        with ``strength`` < 1 is image-to-image; with ``mask`` (white = regenerate)
        inpainting. ``progress`` gets a :class:`~imagen.diffusion.samplers.Progress` after
        every denoiser step; returning False from it stops sampling with
        :class:`~imagen.diffusion.samplers.Cancelled`."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if num_images_per_prompt < 1:
            raise ValueError("num_images_per_prompt must be >= 1")
        negatives = _one_per_image(negative_prompt, len(prompts), "negative prompt")
        n = num_images_per_prompt
        given = dict(
            steps=steps,
            guidance=guidance,
            sampler=sampler,
            threshold=threshold_percentile,
            aug_level=aug_level,
        )
        overrides = replace(
            overrides or SamplingOverrides(), **{k: v for k, v in given.items() if v is not None}
        )
        return self.generate(
            [p for p in prompts for _ in range(n)],
            [seed + j for j in range(len(prompts) * n)],
            overrides,
            batch_size=batch_size,
            return_all_stages=return_all_stages,
            edit=self.make_edit(init_image, strength, mask),
            progress=progress,
            negative_prompts=None
            if negatives is None
            else [p for p in negatives for _ in range(n)],
        )

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        overrides: SamplingOverrides | None = None,
        *,
        batch_size: int = 16,
        return_all_stages: bool = False,
        edit: Edit | None = None,
        progress: ProgressCallback | None = None,
        negative_prompts: list[str] | None = None,
    ) -> PipelineOutput:
        """One image per (prompt, seed) pair (and negative prompt, if given), ``batch_size`` at a
        time, each stage sampled with its defaults changed by ``overrides``; each distinct text
        is encoded once. The lower-level entry point of :meth:`__call__`, the command line and
        the server."""
        if not prompts:
            raise ValueError("no prompts given")
        if len(seeds) != len(prompts) or batch_size < 1:
            raise ValueError("give one seed per prompt and a batch_size >= 1")
        negatives = _one_per_image(negative_prompts, len(prompts), "negative prompt")
        work = _Batches(list(prompts), list(seeds), negatives)
        sampling = self.sampling_configs(overrides)
        return self._run(work, sampling, batch_size, return_all_stages, edit, progress)

    @torch.no_grad()
    def upscale(
        self,
        images: Image.Image | Sequence[Image.Image],
        prompts: str | Sequence[str],
        overrides: SamplingOverrides | None = None,
        seed: int = 0,
        batch_size: int = 16,
        negative_prompt: str | Sequence[str] | None = None,
        progress: ProgressCallback | None = None,
        return_all_stages: bool = False,
    ) -> PipelineOutput:
        """Run images through the super-resolution stages: from the SR stage whose input size
        is nearest the images' size (each image is resized to it, square), to the last.
        ``prompts`` describes the images (one for all, or one per image); image j uses seed
        ``seed + j``."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        if not images:
            raise ValueError("no images to upscale")
        n = len(images)
        texts = [prompts] * n if isinstance(prompts, str) else list(prompts)
        if len(texts) != n:
            raise ValueError(f"{len(texts)} prompts for {n} images")
        start = self.upscale_start(max(images[0].size))
        size = self.cascade.stages[start].config.lowres_size
        assert size is not None
        lowres = torch.stack(
            [resize(pil_to_tensor(im)[None], size)[0] for im in (i.convert("RGB") for i in images)]
        )
        work = _Batches(
            texts,
            [seed + j for j in range(n)],
            _one_per_image(negative_prompt, n, "negative prompt"),
            lowres,
        )
        sampling = self.sampling_configs(overrides)
        return self._run(work, sampling, batch_size, return_all_stages, None, progress, start)

    def upscale_start(self, size: int) -> int:
        """The SR stage an image of ``size`` px enters: the one whose input size is nearest."""
        candidates = [
            (abs(st.config.lowres_size - size), k)
            for k, st in enumerate(self.cascade.stages)
            if st.config.lowres_size is not None
        ]
        if not candidates:
            raise ValueError("this model has no super-resolution stage to upscale with")
        return min(candidates)[1]

    def _run(
        self,
        work: _Batches,
        sampling: list[SamplingConfig],
        batch_size: int,
        return_all_stages: bool,
        edit: Edit | None,
        progress: ProgressCallback | None,
        start_stage: int = 0,
    ) -> PipelineOutput:
        """Sample ``work`` in batches, each image with its own generator."""
        warnings = self.check_words(work.prompts)
        notes = self.notes + self._check_precision(sampling[start_stage:])
        run = range(start_stage, self.num_stages)
        text, rows = self._encode(work.prompts + (work.negatives or []), run)
        total = len(work.prompts)
        per_stage: list[list[Image.Image]] = [[] for _ in range(self.num_stages - start_stage)]
        for start in range(0, total, batch_size):
            chunk = slice(start, min(start + batch_size, total))
            outs = self.cascade.sample(
                _rows(text, rows, work.prompts[chunk]),
                sampling=sampling,
                return_all_stages=True,
                progress=_in_call(progress, start, total),
                edit=edit,
                negative=None
                if work.negatives is None
                else _rows(text, rows, work.negatives[chunk]),
                start_stage=start_stage,
                lowres=None if work.lowres is None else work.lowres[chunk],
                seeds=work.seeds[chunk],  # every stage draws from generators seeded with them
            )
            for k, imgs in enumerate(outs):
                per_stage[k].extend(tensor_to_pil(x) for x in imgs.cpu())
        return PipelineOutput(
            per_stage[-1],
            work.prompts,
            work.seeds,
            per_stage if return_all_stages else [],
            sampling[start_stage:],
            work.negatives or [],
            warnings,
            [self.prompt_warnings(p) + notes for p in work.prompts],
        )

    def check_words(self, prompts: list[str]) -> list[str]:
        """A warning naming the prompts' words that no training caption of this model had
        (logged once per word per pipeline); none for models without a recorded vocabulary."""
        if self.vocabulary is None:
            return []
        unknown = unknown_words(prompts, self.vocabulary)
        if not unknown:
            return []
        message = (
            f"this model never saw the word(s) {', '.join(unknown)} in training, so it will "
            "ignore them (the bundled Shapes model knows colours, shapes and places only); "
            'for photographs from text, import DeepFloyd IF (README: "DeepFloyd IF")'
        )
        if not set(unknown) <= self._warned:
            log.warning("%s", message)
            self._warned.update(unknown)
        return [message]

    def prompt_warnings(self, prompt: str) -> list[str]:
        """The short warning about one image's prompt: ``unknown words: golden, beret``."""
        if self.vocabulary is None:
            return []
        unknown = unknown_words([prompt], self.vocabulary)
        return [f"unknown words: {', '.join(unknown)}"] if unknown else []

    def note(self, short: str, message: str) -> None:
        """Something that applies to every image from now on: ``short`` joins each image's
        warnings, ``message`` is logged (once)."""
        if short not in self.notes:
            self.notes.append(short)
        self._log_once(message)

    def _log_once(self, message: str) -> None:
        if message not in self._logged:
            log.warning("%s", message)
            self._logged.add(message)

    def _check_precision(self, sampling: list[SamplingConfig]) -> list[str]:
        """bf16 asked for (``dtype=torch.bfloat16``, ``--bf16``) on a device where it is not
        fast falls back to float32, as a stage's stored bf16 does: say so. (A stored default
        that falls back is the documented behaviour, not a warning.)"""
        if self.autocast_dtype != torch.bfloat16:
            return []
        lm = self.cascade.low_memory
        device = lm.device if lm is not None else self.cascade.stages[0].device
        if all(s.precision != "bf16" or s.autocast_dtype(device) is not None for s in sampling):
            return []
        self._log_once(
            f"bf16 was asked for, but this {device.type} has no fast bf16 (a GPU with bf16, or a "
            "CPU with AVX-512 BF16 or AMX), so the U-Nets ran in float32"
        )
        return [f"ran in float32: {device.type} has no fast bf16"]

    def _encode(self, texts: list[str], run: range) -> tuple[Embeddings, dict[str, int]]:
        """Every distinct text encoded once by each text encoder the stages of ``run`` read
        (one padded length), and each text's row."""
        unique = list(dict.fromkeys(texts))
        return self.cascade.encode(unique, run), {p: i for i, p in enumerate(unique)}

    @staticmethod
    def make_edit(
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


def _rows(text: Embeddings, rows: dict[str, int], texts: list[str]) -> Embeddings:
    """The embeddings of ``texts`` (rows of the encoded distinct texts), per encoder."""
    out = {}
    for key, emb in text.items():
        idx = torch.tensor([rows[p] for p in texts], device=emb.mask.device)
        out[key] = TextEmbedding(emb.tokens[idx], emb.mask[idx])
    return out


def _in_call(progress: ProgressCallback | None, start: int, total: int) -> ProgressCallback | None:
    """``progress`` for the batch starting at image ``start`` of ``total``."""
    if progress is None:
        return None
    return lambda p: progress(replace(p, batch_start=start, images_total=total))


def load_model(
    directory: Path, device: str | torch.device = "cpu", low_memory: bool | None = None
) -> Cascade:
    """Load a model directory; a damaged weights file is a ValueError naming the file."""
    from safetensors import SafetensorError

    try:
        return load_cascade(directory, device, low_memory=low_memory)
    except SafetensorError as e:
        raise ValueError(f"{damaged_weights(directory) or directory}: damaged weights ({e})") from e


def damaged_weights(directory: Path) -> Path | None:
    """The first weights file of a model directory that safetensors cannot read."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(directory).glob("*/model.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    f.get_slice(key)
        except SafetensorError:
            return path
    return None
