"""``imagen distill``: a faster student of one stage of a model (guidance or progressive
distillation, see :mod:`imagen.training.distill`), trained and resumed like ``imagen train``,
optionally written out as a model directory with the other stages unchanged."""

from __future__ import annotations

import argparse
from pathlib import Path

from imagen.cli.common import (
    WEIGHT_DTYPE_NAMES,
    UsageError,
    command,
    device,
    finite_float,
    float_list,
    positive_int,
)
from imagen.cli.train import add_run_options, run_config
from imagen.utils.outputs import check_output_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``distill`` command."""
    d = sub.add_parser("distill", help="distil a stage of a model into a faster student")
    add_run_options(d)
    d.add_argument("--teacher", required=True, help="model directory whose stage --stage is taught")
    d.add_argument("--mode", choices=["guidance", "progressive"], default="guidance")
    d.add_argument(
        "--guidance-range",
        type=float_list,
        default=[1.0, 6.0],
        help="guidance weights the student learns, MIN,MAX (default 1,6)",
    )
    d.add_argument(
        "--guidance",
        type=finite_float,
        default=3.0,
        help="progressive, from a teacher without a guidance input: the weight built in",
    )
    d.add_argument(
        "--teacher-steps",
        type=positive_int,
        default=16,
        help="progressive: the teacher's DDIM steps (the student takes half)",
    )
    d.add_argument(
        "--model-out", help="also write the teacher's model with this stage replaced by the student"
    )
    d.add_argument(
        "--dtype", choices=WEIGHT_DTYPE_NAMES, default="fp16", help="weights of --model-out"
    )
    d.add_argument("--device", type=device, help="cpu, cuda ... (default: cuda if available)")
    d.add_argument("--threads", type=positive_int, help="CPU threads for torch")


def teacher_stage(model: str, stage: int) -> Path:
    """The stage directory of ``model`` that is distilled."""
    from imagen.models.model_dir import read_index

    stages = read_index(model)["stages"]
    if not 0 <= stage < len(stages):
        raise UsageError(f"--stage {stage}: the teacher model has {len(stages)} stage(s)")
    return Path(model) / stages[stage]


@command("distill")
def cmd_distill(args: argparse.Namespace) -> int:
    from imagen.training.distill import DistillConfig
    from imagen.training.trainer import train_stage

    check_output_dir(args.out)
    if args.model_out:
        check_output_dir(args.model_out, "--model-out")
    if len(args.guidance_range) != 2:
        raise UsageError("--guidance-range takes two numbers, MIN,MAX")
    teacher = teacher_stage(args.teacher, args.stage)
    distill = DistillConfig(
        mode=args.mode,
        teacher=str(teacher.resolve()),
        guidance_min=args.guidance_range[0],
        guidance_max=args.guidance_range[1],
        guidance=args.guidance,
        teacher_steps=args.teacher_steps,
    )
    cfg = run_config(args)
    summary = train_stage(
        cfg, args.stage, args.out, args.max_steps, args.resume, device=args.device, distill=distill
    )
    print(f"distilled stage {args.stage} to step {summary['step']} in {summary['run_dir']}")
    if args.model_out:
        from imagen.training.export import replace_stage
        from imagen.utils.tensors import weights_dtype

        root = replace_stage(
            args.teacher, args.stage, args.out, args.model_out, weights_dtype(args.dtype)
        )
        print(f"wrote model directory {root} (stage {args.stage} distilled from {teacher})")
    return 0
