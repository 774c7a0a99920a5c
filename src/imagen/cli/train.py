"""``imagen train`` (one stage of a cascade), ``imagen export`` (trained stages -> a model
directory) and ``imagen embed`` (a text-embedding cache of a dataset's captions)."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from imagen.cli.common import (
    MODEL_OVERWRITE_HELP,
    WEIGHT_DTYPE_NAMES,
    UsageError,
    command,
    device,
    float_list,
    int_list,
    positive_float,
    positive_int,
    threshold,
)
from imagen.utils.outputs import check_output_dir

if TYPE_CHECKING:
    from imagen.models.sampling import SamplingOverrides
    from imagen.training.config import CascadeRunConfig


def add_run_options(p: argparse.ArgumentParser) -> None:
    """What names a training run: the config, the stage, the run directory and the overrides of
    its training settings (shared by ``train`` and ``distill``)."""
    p.add_argument("config", help="cascade config (.yaml, .toml or .json)")
    p.add_argument(
        "--stage", type=int, required=True, help="index of the stage to train (0 = base)"
    )
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, samples)")
    p.add_argument("--max-steps", type=positive_int, help="override train.max_steps")
    p.add_argument(
        "--batch-size", type=positive_int, help="override train.batch_size (per process)"
    )
    p.add_argument("--lr", type=positive_float, help="override train.lr")
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )


def run_config(args: argparse.Namespace) -> CascadeRunConfig:
    """The config of ``args.config`` with the command line's overrides of stage
    ``args.stage``'s training settings (a new config: the loaded one is never changed)."""
    from imagen.training.config import load_cascade_config

    cfg = load_cascade_config(args.config)
    if not 0 <= args.stage < len(cfg.stages):
        raise UsageError(f"--stage {args.stage}: the config has {len(cfg.stages)} stage(s)")
    changes = {"batch_size": args.batch_size, "lr": args.lr}
    changes = {k: v for k, v in changes.items() if v is not None}
    if changes:
        run = cfg.stages[args.stage]
        stages = list(cfg.stages)
        stages[args.stage] = replace(run, train=replace(run.train, **changes))
        cfg = replace(cfg, stages=stages)
    return cfg


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``train``, ``export`` and ``embed`` commands."""
    t = sub.add_parser("train", help="train one stage of a cascade")
    add_run_options(t)
    t.add_argument("--embeddings", help="text-embedding cache directory made by `imagen embed`")
    t.add_argument(
        "--device", type=device, help="cpu, cuda, cuda:1 ... (default: cuda if available)"
    )
    t.add_argument("--threads", type=positive_int, help="CPU threads for torch")

    e = sub.add_parser("export", help="assemble trained stages into a model directory")
    e.add_argument(
        "runs",
        nargs="+",
        help="training run directories or stages of a model (MODEL_DIR/stageK), base first",
    )
    e.add_argument("--out", required=True, help="model directory to write")
    e.add_argument("--weights", choices=["ema", "model"], default="ema")
    e.add_argument(
        "--dtype",
        choices=WEIGHT_DTYPE_NAMES,
        default="fp16",
        help="weight storage; int8: weight-only, one scale per output channel",
    )
    e.add_argument("--steps-per-stage", type=int_list, help="default sampling steps, e.g. 10,8,8")
    e.add_argument(
        "--guidance-per-stage", type=float_list, help="default guidance scales, e.g. 3,1,1"
    )
    e.add_argument(
        "--precision", choices=["fp32", "bf16"], help="default sampling precision of every stage"
    )
    e.add_argument(
        "--threshold",
        type=threshold,
        help="default thresholding of every stage: a dynamic percentile, or static or none",
    )
    e.add_argument("--notes", help="a JSON file whose object is recorded in model_index.json")
    e.add_argument("--overwrite", action="store_true", help=MODEL_OVERWRITE_HELP)
    e.add_argument(
        "--format",
        choices=["imagen", "lora", "diffusers"],
        help="imagen: a model directory (a LoRA run is merged into its base stage); lora: a LoRA "
        "run's adapter as diffusers' pytorch_lora_weights.safetensors (the default for one LoRA "
        "run); diffusers: DeepFloyd IF stages as IFPipeline / IFSuperResolutionPipeline folders",
    )
    e.add_argument(
        "--copy",
        action="store_true",
        help="--format diffusers: copy T5 and its tokenizer into the folder (default: hard links)",
    )

    m = sub.add_parser("embed", help="precompute the text embeddings of a dataset's captions")
    m.add_argument("config", help="cascade config: its text_encoder and data are used")
    m.add_argument("--out", required=True, help="cache directory")
    m.add_argument("--batch-size", type=positive_int, default=256)
    m.add_argument("--device", type=device, help="cpu, cuda ... (default: cuda if available)")


@command("train")
def cmd_train(args: argparse.Namespace) -> int:
    check_output_dir(args.out)
    cfg = run_config(args)
    cache = None
    if args.embeddings:
        from imagen.text.cache import EmbeddingCache

        cache = EmbeddingCache.open(args.embeddings)
    from imagen.training.lora import train_stage  # also for train.lora runs

    summary = train_stage(
        cfg,
        args.stage,
        args.out,
        args.max_steps,
        args.resume,
        embedding_cache=cache,
        device=args.device,
    )
    print(f"trained stage {args.stage} to step {summary['step']} in {summary['run_dir']}")
    return 0


@command("export")
def cmd_export(args: argparse.Namespace) -> int:
    check_output_dir(args.out)
    for run in args.runs:
        if not os.path.isdir(run):
            raise UsageError(f"training run directory not found: {run}")
    notes = read_notes(args.notes) if args.notes else None
    from imagen.training.export import export_model
    from imagen.training.lora_export import is_lora_run
    from imagen.utils.outputs import sigterm_exits
    from imagen.utils.tensors import weights_dtype

    fmt = args.format or ("lora" if len(args.runs) == 1 and is_lora_run(args.runs[0]) else "imagen")
    if fmt == "lora":
        return export_lora_folder(args)
    with sigterm_exits():  # SIGTERM removes the half-written model beside --out, as Ctrl-C does
        if fmt == "diffusers":
            from imagen.training.diffusers_export import export_diffusers

            root = export_diffusers(
                args.runs,
                args.out,
                args.weights,
                weights_dtype(args.dtype),
                args.copy,
                sampling_changes(args),
            )
            print(f"wrote diffusers pipeline folder(s) {root}")
            return 0
        root = export_model(
            args.runs,
            args.out,
            args.weights,
            weights_dtype(args.dtype),
            notes,
            sampling=sampling_changes(args),
            overwrite=args.overwrite,
        )
    print(f"wrote model directory {root}")
    return 0


def export_lora_folder(args: argparse.Namespace) -> int:
    """``imagen export LORA_RUN --format lora``: the adapter as diffusers' LoRA file."""
    from imagen.training.lora_export import export_lora
    from imagen.utils.outputs import sigterm_exits

    if len(args.runs) != 1:
        raise UsageError("--format lora exports one LoRA run at a time")
    with sigterm_exits():
        root = export_lora(args.runs[0], args.out, args.weights)
    print(f"wrote {root}/pytorch_lora_weights.safetensors (diffusers' LoRA format)")
    return 0


def read_notes(path: str) -> dict:
    """The JSON object of ``--notes`` (recorded in the model's index)."""
    from imagen.utils.config import load_json_file

    try:  # bounded: size, nesting and value count (a config's limits)
        notes = load_json_file(Path(path), "--notes file")
    except (OSError, ValueError) as e:
        raise UsageError(f"--notes {path}: {e}") from None
    if not isinstance(notes, dict):
        raise UsageError(f"--notes {path}: expected a JSON object")
    return notes


def sampling_changes(args: argparse.Namespace) -> SamplingOverrides | None:
    """The changes to the exported stages' default sampling settings, if any (resolved by
    :meth:`SamplingOverrides.apply`, as a sampling call's are)."""
    from imagen.models.sampling import SamplingOverrides

    changes = SamplingOverrides(
        steps=args.steps_per_stage,
        guidance=args.guidance_per_stage,
        precision=args.precision,
        threshold=args.threshold,
    )
    return changes if changes != SamplingOverrides() else None


@command("embed")
def cmd_embed(args: argparse.Namespace) -> int:
    import torch

    from imagen.text.cache import build_cache
    from imagen.text.encoders import load_text_encoder
    from imagen.training.config import load_cascade_config
    from imagen.training.data import dataset_captions

    check_output_dir(args.out)
    cfg = load_cascade_config(args.config)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    dev = args.device or (
        f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    )
    encoder = load_text_encoder(cfg.text_encoder, dev)
    stats = build_cache(
        dataset_captions(cfg.data), encoder, args.out, args.batch_size, rank=rank, world=world
    )
    print(
        f"rank {rank}/{world}: {stats['captions']} captions, {stats['bytes'] / 1e6:.2f} MB, "
        f"{stats['bytes_per_caption']:.0f} bytes/caption, {stats['captions_per_s']:.1f} captions/s "
        f"-> {args.out}"
    )
    return 0
