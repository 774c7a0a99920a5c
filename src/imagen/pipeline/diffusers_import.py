"""``imagen import``: DeepFloyd IF pipelines (and the Stable Diffusion x4 upscaler as stage III,
pipeline/x4_import.py) in diffusers format as an imagen model directory.

The base (an ``IFPipeline`` folder or Hub repo) comes first, then super-resolution stages
(``IFSuperResolutionPipeline``). Each stage becomes a ``diffusers-unet`` stage whose weights
file is the published one, hard-linked (or symlinked across file systems; copied with
``copy``) and recorded by sha256; its sampling defaults are IF's (DDPM with leading spacing
and the learned-range variance, 100 steps at guidance 7 for the base, 50 at guidance 4 and
noise level 250 for super-resolution, dynamic thresholding at 0.95 capped at 1.5 and 1.0),
and its null caption is T5("") as IF's pipelines use it. The text encoder (T5 and its
tokenizer) is the first source's, or the one given; it is referenced, never copied. The
directory records the sources and the weights' licence notice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imagen.diffusion.guidance import ThresholdConfig
from imagen.diffusion.schedules import DiffusionConfig
from imagen.models.cascade import LOW_MEMORY_BYTES
from imagen.models.model_dir import WeightsFile, check_model_target, save_model_dir
from imagen.models.networks import DiffusersUNetConfig
from imagen.models.sampling import SamplingConfig
from imagen.models.stage_config import StageConfig
from imagen.pipeline import import_checks
from imagen.pipeline.hub import REPO_ID, hub_snapshot
from imagen.pipeline.import_checks import trusted_root
from imagen.pipeline.x4_import import (
    UPSCALE,
    X4_LICENCE,
    x4_stage_config,
    x4_text_encoder,
    x4_weights,
)
from imagen.text.encoders import (
    TextEncoder,
    TextEncoderConfig,
    load_text_encoder,
    load_text_encoder_low_memory,
)

BASE, SR = "IFPipeline", "IFSuperResolutionPipeline"
IF_NOISE_LEVEL = 250  # the SR pipelines' default augmentation timestep
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
LICENCE = (
    "DeepFloyd IF weights are licensed under the DeepFloyd IF License Agreement "
    "(non-commercial research use; see each source's LICENSE and model card). This model "
    "directory links to them: do not redistribute it with the weights."
)


def _read_json(path: Path, within: Path | None = None) -> dict[str, Any]:
    # [import checks] a regular file inside the pipeline folder, read bounded (size, depth)
    return import_checks.read_config(path, within)


def resolve_source(source: str) -> tuple[Path, str | None]:
    """A pipeline folder for ``source`` (a directory, or a Hub repo id from the cache) and its
    revision (the snapshot's commit for a Hub repo)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve(), None
    if not REPO_ID.match(source):
        raise FileNotFoundError(f"{source} is neither a directory nor a Hub repo id (ORG/NAME)")
    root = hub_snapshot(source, "diffusers pipeline folder")
    return root, root.name


def _pipeline_class(root: Path) -> str:
    index = _read_json(root / "model_index.json", trusted_root(root))
    name = index.get("_class_name")
    if name not in (BASE, SR, UPSCALE):
        raise ValueError(
            f"{root} holds a {name}; imagen import takes {BASE}, {SR} and {UPSCALE} folders"
        )
    return str(name)


def _scheduler(root: Path, folder: str = "scheduler") -> dict[str, Any]:
    """The DDPM scheduler config of a pipeline part, checked to be what IF's stages use."""
    # [import checks] bounded, every field type- and range-checked
    cfg = import_checks.read_scheduler(root / folder / "scheduler_config.json", trusted_root(root))
    want = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}
    if folder == "scheduler":
        want |= {"prediction_type": "epsilon", "variance_type": "learned_range"}
    for key, value in want.items():
        got = cfg.get(key, import_checks.DDPM_DEFAULTS[key])  # [import checks] diffusers' default
        if got != value:
            raise ValueError(f"{root / folder}: {key} is {got!r}, IF stages use {value!r}")
    return cfg


def _weights(root: Path, variant: str | None) -> Path:
    names = WEIGHT_NAMES if variant is None else (f"diffusion_pytorch_model.{variant}.safetensors",)
    # [import checks] config ranges, safetensors only, the header against the network on meta
    unet = import_checks.UNET
    return import_checks.check_component(root / "unet", unet, trusted_root(root), names).weights[0]


def if_stage_config(root: Path, lowres_size: int | None) -> StageConfig:
    """A diffusers-unet stage config with IF's sampling defaults for the pipeline at ``root``
    (a super-resolution stage when ``lowres_size`` is given)."""
    unet = _read_json(root / "unet" / "config.json", trusted_root(root))
    import_checks.UNET.check_config(unet, str(root / "unet" / "config.json"))  # [import checks]
    sched = _scheduler(root)
    sr = lowres_size is not None
    if sr:
        _scheduler(root, "image_noising_scheduler")
    threshold = ThresholdConfig(
        mode="dynamic" if sched.get("thresholding", False) else "none",
        percentile=float(sched.get("dynamic_thresholding_ratio", 0.995)),
        max_scale=float(sched.get("sample_max_value", 1.0)),
    )
    sampling = SamplingConfig(
        sampler="ddpm",
        steps=50 if sr else 100,
        guidance=4.0 if sr else 7.0,
        threshold=threshold,
        aug_level=IF_NOISE_LEVEL / 999 if sr else 0.0,
        precision="bf16",
        ddpm_variance="learned_range",
        spacing="leading",
        lambda_min=-5.1,
    )
    return StageConfig(
        unet=DiffusersUNetConfig(config=unet, image_channels=3, lowres_cond=sr),
        diffusion=DiffusionConfig(schedule="cosine", timesteps=1000, float32_alphas=True),
        sampling=sampling,
        lowres_size=lowres_size,
        network="diffusers-unet",
        lowres_align_corners=True,
    )


def _text_encoder(root: Path, given: str | None) -> TextEncoderConfig:
    if given is not None:
        d = Path(given).expanduser().resolve()
        model = d / "text_encoder" if (d / "text_encoder").is_dir() else d
        tok = d / "tokenizer" if (d / "tokenizer").is_dir() else d
    else:
        model, tok = root / "text_encoder", root / "tokenizer"
    for part in (model, tok):
        if not part.is_dir():
            raise FileNotFoundError(f"no T5 text encoder at {part}; pass --text-encoder DIR")
    return TextEncoderConfig(
        name=str(model), max_length=77, padding="max_length", tokenizer=str(tok)
    )


def _load_encoder(config: TextEncoderConfig) -> TextEncoder:
    """The T5 encoder, held as a low-memory cascade holds it when its weights are large
    (T5-XXL: bf16, computed in float32 where the CPU has no fast bf16)."""
    files = Path(config.name).glob("*.safetensors")
    if sum(f.stat().st_size for f in files) <= LOW_MEMORY_BYTES:
        return load_text_encoder(config)
    return load_text_encoder_low_memory(config)


@dataclass
class _Imported:
    """One imported stage: its config, weights, space weights and text encoder."""

    config: StageConfig
    weights: WeightsFile
    space: WeightsFile | dict[str, torch.Tensor] | None
    encoder: TextEncoderConfig


def _check_order(classes: list[str]) -> None:
    """An optional IF base, then IF super-resolution stages, then at most one x4 upscaler."""
    order = {BASE: 0, SR: 1, UPSCALE: 2}
    ranks = [order[c] for c in classes]
    ok = ranks == sorted(ranks) and ranks.count(0) <= 1 and ranks.count(2) <= 1
    if ok and (ranks[0] == 0 or ranks == [2]):
        return
    raise ValueError(
        f"give the {BASE} first, then {SR} folders, then optionally a {UPSCALE} (or a "
        f"{UPSCALE} alone); got {', '.join(classes)}"
    )


def _import_stage(
    root: Path, cls: str, lowres: int | None, t5: TextEncoderConfig | None, args: tuple
) -> _Imported:
    copy, variant = args
    if cls == UPSCALE:
        w = x4_weights(root, variant, copy)
        return _Imported(x4_stage_config(root, lowres), w.unet, w.vae, x4_text_encoder(root))
    assert t5 is not None
    weights = WeightsFile(_weights(root, variant), copy)
    return _Imported(if_stage_config(root, lowres), weights, None, t5)


def _null_captions(
    encoders: list[TextEncoderConfig], loaded: TextEncoder | None
) -> tuple[list, list]:
    """Each stage's encoder record and null caption (its encoder's "", as the pipelines
    encode it), loading each distinct encoder once (``loaded``: T5, checked and loaded
    already) and releasing it."""
    records, nulls, done = [], [], {}
    for config in encoders:
        key = (config.name, config.kind)
        if key not in done:
            encoder = loaded if loaded is not None and not config.kind else _load_encoder(config)
            null = encoder.encode([""])
            done[key] = (
                {**encoder.config(), "dim": encoder.dim},
                (null.tokens[0].cpu(), null.mask[0].cpu()),
            )
            del encoder
        records.append(done[key][0])
        nulls.append(done[key][1])
    return records, nulls


def _checked_t5(
    te_config: TextEncoderConfig, te_root: Path, stages: list[_Imported], roots: list[Path]
) -> TextEncoder:
    """[import checks] the tokenizer and T5 checked before they load, then their output;
    returns the loaded encoder."""
    te = import_checks.check_text_encoder(
        Path(te_config.name),
        Path(str(te_config.tokenizer)),
        trusted_root(te_root),
        [s.config.unet.text_dim for s in stages],
        [root / "unet" for root in roots],
    )
    encoder = import_checks.load_checked(lambda: _load_encoder(te_config), Path(te_config.name))
    import_checks.check_encoder_output(
        encoder, int(te.config.get("vocab_size", 32128)), Path(str(te_config.tokenizer))
    )
    return encoder


def import_if(
    sources: list[str],
    out: str | Path,
    copy: bool = False,
    text_encoder: str | None = None,
    variant: str | None = None,
    overwrite: bool = False,
    x4_size: int | None = None,
) -> Path:
    """Write the model directory ``out`` for diffusers pipelines ``sources``: DeepFloyd IF's
    base and super-resolution stages, then optionally the Stable Diffusion x4 upscaler as the
    last stage (or the x4 upscaler alone: a model that only upscales ``x4_size`` px images,
    256 by default), after checking every part it uses (pipeline/import_checks.py,
    pipeline/x4_checks.py): nothing is written unless all pass. ``overwrite`` keeps files
    other than an earlier model's beside the new one."""
    if not sources:
        raise ValueError("give at least one pipeline: the IF base (IFPipeline) first")
    check_model_target(out, overwrite, len(sources))  # [import checks] before anything is read
    resolved = [resolve_source(s) for s in sources]
    classes = [_pipeline_class(root) for root, _ in resolved]
    _check_order(classes)
    if_roots = [root for (root, _), c in zip(resolved, classes, strict=True) if c != UPSCALE]
    t5 = _text_encoder(if_roots[0], text_encoder) if if_roots else None
    stages: list[_Imported] = []
    for (root, _), cls in zip(resolved, classes, strict=True):
        lowres = stages[-1].config.resolution if stages else x4_size
        stages.append(_import_stage(root, cls, lowres, t5, (copy, variant)))
    encoder = None
    if t5 is not None:
        te_root = if_roots[0] if text_encoder is None else Path(text_encoder).expanduser().resolve()
        encoder = _checked_t5(t5, te_root, [s for s in stages if s.encoder is t5], if_roots)
    records, nulls = _null_captions([s.encoder for s in stages], encoder)
    del encoder  # released: the model directory references it
    licences = [LICENCE] if if_roots else []
    licences += [X4_LICENCE] if UPSCALE in classes else []
    extra = {
        "imported": [
            {"source": s, "path": str(root), "pipeline": c, "revision": rev}
            for s, (root, rev), c in zip(sources, resolved, classes, strict=True)
        ],
        "licence": " ".join(licences),
    }
    return save_model_dir(
        out,
        records,
        [s.config for s in stages],
        [s.weights for s in stages],
        None,
        extra,
        null_texts=nulls,
        spaces=[s.space for s in stages],
        overwrite=overwrite,
    )
