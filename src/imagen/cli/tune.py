"""``imagen tune``: teach a model a subject from a few images, as a LoRA (DreamBooth-style
subject tuning; the library code is :mod:`imagen.training.tune`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from imagen.cli.common import (
    MODEL_HELP,
    UsageError,
    command,
    device,
    positive_float,
    positive_int,
)
from imagen.utils.outputs import check_output_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``tune`` command."""
    t = sub.add_parser("tune", help="teach a model a subject from a few images (a LoRA)")
    t.add_argument("images", metavar="IMAGES_DIR", help="a folder of a few images of the subject")
    t.add_argument("--token", required=True, help='the subject\'s name in prompts, e.g. "sks dog"')
    t.add_argument(
        "--class-prompt",
        help="the subject's class, e.g. \"a dog\": prior preservation with the model's own images of it",
    )
    t.add_argument(
        "--num-class-images", type=positive_int, default=50, help="class images (default 50)"
    )
    t.add_argument(
        "--template",
        default="a {token}",
        help='the caption of every subject image (default "a {token}")',
    )
    t.add_argument("--model", help=MODEL_HELP)
    t.add_argument("--out", required=True, help="run directory (checkpoints, lora/, samples)")
    t.add_argument("--stage", type=int, default=0, help="the stage to tune (default 0, the base)")
    t.add_argument("--steps", type=positive_int, help="training steps (default: per stage)")
    t.add_argument("--lr", type=positive_float, help="learning rate (default: per stage)")
    t.add_argument("--rank", type=positive_int, help="LoRA rank (default: per stage)")
    t.add_argument("--batch-size", type=positive_int, help="batch size (default: per stage)")
    t.add_argument("--seed", type=int, default=0, help="training seed")
    t.add_argument(
        "--grid-steps",
        type=positive_int,
        help="sampling steps of the final grid (default: each stage's)",
    )
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--device", type=device, help="cpu, cuda ... (default: cuda if available)")
    t.add_argument("--threads", type=positive_int, help="CPU threads for torch")


@command("tune")
def cmd_tune(args: argparse.Namespace) -> int:
    images = Path(args.images)
    if not images.is_dir():
        raise UsageError(f"IMAGES_DIR not found: {images}")
    if "{token}" not in args.template:
        raise UsageError("--template must contain {token}")
    out = check_output_dir(args.out)
    from imagen.pipeline import resolve_model
    from imagen.training.tune import TuneOptions, tune

    options = TuneOptions(
        images=images,
        token=args.token,
        model=resolve_model(args.model),
        out=out,
        class_prompt=args.class_prompt,
        num_class_images=args.num_class_images,
        template=args.template,
        stage=args.stage,
        steps=args.steps,
        lr=args.lr,
        rank=args.rank,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        grid_steps=args.grid_steps,
    )
    record = tune(options, resume=args.resume)
    print(
        f"tuned stage {args.stage} for {record['prompt']!r} in {record['seconds']['training']:.0f} s: "
        f"LoRA {record['lora']}, samples {record['grid']}"
    )
    return 0
