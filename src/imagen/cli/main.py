"""The ``imagen`` command line: train, export, sample, eval, embed, prepare, serve, demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


def command(
    name: str,
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = fn
        return fn

    return register


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imagen", description="Cascaded text-to-image diffusion (Imagen)."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one stage of a cascade")
    t.add_argument("config", help="cascade config (.yaml, .toml or .json)")
    t.add_argument(
        "--stage", type=int, required=True, help="index of the stage to train (0 = base)"
    )
    t.add_argument("--out", required=True, help="run directory (checkpoints, logs, samples)")
    t.add_argument("--max-steps", type=positive_int, help="override train.max_steps")
    t.add_argument(
        "--batch-size", type=positive_int, help="override train.batch_size (per process)"
    )
    t.add_argument("--lr", type=float, help="override train.lr")
    t.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )
    t.add_argument("--embeddings", help="text-embedding cache directory made by `imagen embed`")
    t.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    t.add_argument("--threads", type=positive_int, help="CPU threads for torch")

    e = sub.add_parser("export", help="assemble trained stages into a model directory")
    e.add_argument("runs", nargs="+", help="training run directories, base stage first")
    e.add_argument("--out", required=True, help="model directory to write")
    e.add_argument("--weights", choices=["ema", "model"], default="ema")
    e.add_argument(
        "--dtype",
        choices=["fp16", "fp32", "bf16", "int8"],
        default="fp16",
        help="weight storage; int8: weight-only, one scale per output channel",
    )

    m = sub.add_parser("embed", help="precompute the text embeddings of a dataset's captions")
    m.add_argument("config", help="cascade config: its text_encoder and data are used")
    m.add_argument("--out", required=True, help="cache directory")
    m.add_argument("--batch-size", type=positive_int, default=256)
    m.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")

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
        q.add_argument("--model", help="model directory (default: the bundled Shapes cascade)")
        q.add_argument("--guidance", type=float)
        q.add_argument("--steps", type=positive_int)
        q.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"])
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--batch-size", type=positive_int, default=32)
        q.add_argument("--device", default="cpu")
        q.add_argument("--bf16", action="store_true", help="run the U-Nets under bf16 autocast")
        q.add_argument("--threads", type=positive_int)

    r = sub.add_parser("prepare", help="make a training folder from an offline dataset")
    r.add_argument("dataset", choices=["fashion-mnist", "emoji"])
    r.add_argument("out", help="output folder")
    r.add_argument("--limit", type=positive_int, help="at most this many images (per split)")
    r.add_argument("--size", type=positive_int, default=128, help="emoji: image size in px")

    sv = sub.add_parser("serve", help="HTTP API and web page (binds 127.0.0.1 by default)")
    sv.add_argument("--model", help="model directory (default: the bundled Shapes cascade)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=positive_int, default=8000)
    sv.add_argument(
        "--max-queue", type=positive_int, default=16, help="requests waiting or running"
    )
    sv.add_argument(
        "--max-batch-images", type=positive_int, default=8, help="images per forward pass"
    )
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--threads", type=positive_int)

    dm = sub.add_parser(
        "demo", help="samples from the bundled model (and a model trained here) as HTML"
    )
    dm.add_argument("--out", default="demo", help="output directory (default: demo)")
    dm.add_argument("--model", help="model directory (default: the bundled Shapes cascade)")
    dm.add_argument(
        "--train", action="store_true", help="also train a small base model from scratch"
    )
    dm.add_argument("--minutes", type=float, default=10.0, help="training time budget (default 10)")
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--threads", type=positive_int)

    from imagen.cli.sample import add_sample_parser

    add_sample_parser(sub)
    return p


@command("train")
def cmd_train(args: argparse.Namespace) -> int:
    from imagen.training.config import load_cascade_config
    from imagen.training.trainer import train_stage

    cfg = load_cascade_config(args.config)
    if not 0 <= args.stage < len(cfg.stages):
        raise UsageError(f"--stage {args.stage}: the config has {len(cfg.stages)} stage(s)")
    tc = cfg.stages[args.stage].train
    if args.batch_size:
        tc.batch_size = args.batch_size
    if args.lr:
        tc.lr = args.lr
    cache = None
    if args.embeddings:
        from imagen.text.cache import EmbeddingCache

        cache = EmbeddingCache.open(args.embeddings)
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
    import torch

    from imagen.training.export import export_model

    dtype = {
        "fp16": torch.float16,
        "fp32": torch.float32,
        "bf16": torch.bfloat16,
        "int8": torch.int8,
    }[args.dtype]
    root = export_model(args.runs, args.out, args.weights, dtype)
    print(f"wrote model directory {root}")
    return 0


@command("embed")
def cmd_embed(args: argparse.Namespace) -> int:
    import torch

    from imagen.text.cache import build_cache
    from imagen.text.encoders import load_text_encoder
    from imagen.training.config import load_cascade_config
    from imagen.training.data import dataset_captions

    cfg = load_cascade_config(args.config)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = args.device or (
        f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    )
    encoder = load_text_encoder(cfg.text_encoder, device)
    stats = build_cache(
        dataset_captions(cfg.data), encoder, args.out, args.batch_size, rank=rank, world=world
    )
    print(
        f"rank {rank}/{world}: {stats['captions']} captions, {stats['bytes'] / 1e6:.2f} MB, "
        f"{stats['bytes_per_caption']:.0f} bytes/caption, {stats['captions_per_s']:.1f} captions/s "
        f"-> {args.out}"
    )
    return 0


@command("eval")
def cmd_eval(args: argparse.Namespace) -> int:
    import json

    import torch

    from imagen.evaluation.shapes import eval_fid, eval_shapes
    from imagen.pipeline import ImagenPipeline

    pipe = ImagenPipeline.from_pretrained(
        args.model, args.device, torch.bfloat16 if args.bf16 else None
    )
    common = dict(
        guidance=args.guidance,
        steps=args.steps,
        sampler=args.sampler,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    if args.eval_kind == "shapes":
        report = eval_shapes(pipe, args.num, out_dir=args.out, **common)
    elif args.eval_kind == "fid":
        report = eval_fid(
            pipe,
            args.data,
            args.num,
            feature_network=args.feature_network,
            cache_dir=args.cache_dir,
            **common,
        )
    else:
        raise UsageError(f"unknown evaluation {args.eval_kind!r}")
    report["model"] = args.model or "bundled"
    print(json.dumps(report, indent=2))
    return 0


@command("prepare")
def cmd_prepare(args: argparse.Namespace) -> int:
    from imagen.data.prepare import prepare_emoji, prepare_fashion_mnist

    if args.dataset == "fashion-mnist":
        counts = prepare_fashion_mnist(args.out, limit=args.limit)
    else:
        counts = prepare_emoji(args.out, size=args.size, limit=args.limit)
    print(f"wrote {args.out}: {counts}")
    return 0


@command("serve")
def cmd_serve(args: argparse.Namespace) -> int:
    from imagen.server.app import ServerConfig, serve

    serve(
        args.model,
        ServerConfig(
            host=args.host,
            port=args.port,
            max_queue=args.max_queue,
            max_batch_images=args.max_batch_images,
        ),
        args.device,
    )
    return 0


@command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    from imagen.cli.demo import run_demo

    path = run_demo(args.out, args.model, args.minutes if args.train else None, args.seed)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``imagen`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"imagen {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        if os.environ.get("IMAGEN_DEBUG"):
            raise
        msg = str(e).strip().splitlines()
        print(
            f"imagen {args.command}: error: {msg[0] if msg else type(e).__name__}", file=sys.stderr
        )
        for line in msg[1:8]:
            print(f"  {line.strip()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
