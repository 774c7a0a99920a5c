"""``imagen eval shapes`` (Shapes prompt-following accuracy), ``imagen eval fid`` (FID and
KID against a folder of real images), and (cli/prompt_eval.py) ``imagen eval clip``,
``imagen eval compare`` and ``imagen eval prompts``."""

from __future__ import annotations

import argparse
import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from imagen.cli import prompt_eval
from imagen.cli.common import (
    UsageError,
    add_model_options,
    add_sampling_options,
    checked_configs,
    command,
    load_pipeline,
    positive_int,
    sampling_overrides,
)
from imagen.utils.outputs import StagedOutput, check_output_dir

if TYPE_CHECKING:
    from imagen.pipeline import ImagenPipeline


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``eval`` command and its kinds."""
    v = sub.add_parser(
        "eval",
        help="evaluate a model (shapes: prompt-following accuracy; clip: CLIP score over a "
        "prompt suite; compare: two sampling settings)",
    )
    vsub = v.add_subparsers(dest="eval_kind", required=True)
    vs = vsub.add_parser("shapes", help="Shapes checker accuracy per group and per stage")
    vs.add_argument("--num", type=positive_int, default=50, help="prompts per group")
    vs.add_argument("--out", help="write the images, a grid and report.json here")
    vs.add_argument(
        "--overwrite", action="store_true", help="replace an earlier evaluation's files in --out"
    )
    vs.add_argument(
        "--record",
        action="store_true",
        help="record the report (and a small check a test can rerun) in the model's "
        "model_index.json",
    )
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
    prompt_eval.add_parsers(vsub)


@command("eval")
def cmd_eval(args: argparse.Namespace) -> int:
    if args.eval_kind == "prompts":
        return prompt_eval.list_prompts(args)
    runners = {"shapes": eval_shapes_command, "fid": eval_fid_command, **prompt_eval.RUNNERS}
    report = runners[args.eval_kind](args)
    report["model"] = args.model or "bundled"
    print(json.dumps(report, indent=2))
    return 0


EVAL_FILES = r"report\.json|grid\.png"  # an earlier evaluation in --out (its report, its grid)


def eval_shapes_command(args: argparse.Namespace) -> dict:
    from imagen.evaluation.shapes import eval_shapes

    if args.record:
        args.model_dir = recordable_model_dir(args.model)
    out = (
        StagedOutput(args.out, run_files=EVAL_FILES, overwrite=args.overwrite) if args.out else None
    )
    with out or nullcontext() as staged:
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
    if args.record:
        record(pipe, args, report)
    return report


def record(pipe: ImagenPipeline, args: argparse.Namespace, report: dict) -> None:
    """Store the report in the model directory, with the small check at default settings."""
    import sys

    from imagen.evaluation.shapes import CHECK, eval_shapes, record_evaluation

    check = eval_shapes(pipe, CHECK["num_per_group"], seed=CHECK["seed"])
    command = f"imagen eval shapes --num {args.num} --seed {args.seed}"
    record_evaluation(args.model_dir, report, check, command)
    print(f"recorded in {args.model_dir}", file=sys.stderr)


def recordable_model_dir(model: str | None) -> Path:
    """The local model directory --record writes into (the bundled model by default, or a
    bundled model by name)."""
    from imagen.models.model_dir import INDEX_FILE
    from imagen.pipeline import BUNDLED_MODEL
    from imagen.pipeline.hub import BUNDLED

    path = Path(model) if model else BUNDLED_MODEL
    if model in BUNDLED and not path.exists():
        path = BUNDLED[model]
    if not (path / INDEX_FILE).is_file():
        raise UsageError(f"--record needs a local model directory; {model!r} is not one")
    if not os.access(path / INDEX_FILE, os.W_OK):
        raise UsageError(f"--record: {path / INDEX_FILE} is not writable")
    return path


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
