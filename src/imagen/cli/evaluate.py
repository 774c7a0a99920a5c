"""``imagen eval shapes`` (Shapes prompt-following accuracy) and ``imagen eval fid`` (FID and
KID against a folder of real images)."""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext

from imagen.cli.common import (
    add_model_options,
    add_sampling_options,
    checked_configs,
    command,
    load_pipeline,
    positive_int,
    sampling_overrides,
)
from imagen.cli.output import StagedOutput, check_output_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``eval`` command and its kinds."""
    v = sub.add_parser("eval", help="evaluate a model (shapes: prompt-following accuracy)")
    vsub = v.add_subparsers(dest="eval_kind", required=True)
    vs = vsub.add_parser("shapes", help="Shapes checker accuracy per group and per stage")
    vs.add_argument("--num", type=positive_int, default=50, help="prompts per group")
    vs.add_argument("--out", help="write the images, a grid and report.json here")
    vf = vsub.add_parser("fid", help="FID and KID against an image-text folder")
    vf.add_argument(
        "--data", required=True, help="image-text folder of real images (e.g. from imagen prepare)"
    )
    vf.add_argument("--num", type=positive_int, default=500, help="images on each side")
    vf.add_argument(
        "--feature-network", default="fid-helper-inception", help="name or TorchScript path"
    )
    vf.add_argument("--cache-dir", default=".cache/imagen-fid", help="reference statistics cache")
    for q in (vs, vf):
        add_sampling_options(q)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--batch-size", type=positive_int, default=32)
        add_model_options(q)


@command("eval")
def cmd_eval(args: argparse.Namespace) -> int:
    run = eval_shapes_command if args.eval_kind == "shapes" else eval_fid_command
    report = run(args)
    report["model"] = args.model or "bundled"
    print(json.dumps(report, indent=2))
    return 0


def eval_shapes_command(args: argparse.Namespace) -> dict:
    from imagen.evaluation.shapes import eval_shapes

    with StagedOutput(args.out) if args.out else nullcontext() as staged:
        pipe = load_pipeline(args)
        checked_configs(pipe, args)
        report = eval_shapes(
            pipe,
            args.num,
            sampling_overrides(args),
            args.seed,
            args.batch_size,
            staged.staging if staged else None,
        )
        if staged:
            staged.commit(last=("report.json",))
    return report


def eval_fid_command(args: argparse.Namespace) -> dict:
    from imagen.evaluation.fid import FeatureNetwork
    from imagen.evaluation.shapes import eval_fid

    check_output_dir(args.cache_dir, "--cache-dir")
    network = FeatureNetwork(args.feature_network)  # a bad network fails before any sampling
    pipe = load_pipeline(args)
    checked_configs(pipe, args)
    return eval_fid(
        pipe,
        args.data,
        args.num,
        sampling_overrides(args),
        args.seed,
        args.batch_size,
        network,
        args.cache_dir,
    )
