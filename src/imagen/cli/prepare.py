"""``imagen prepare``: a training folder from an offline dataset."""

from __future__ import annotations

import argparse

from imagen.cli.common import command, positive_int
from imagen.utils.outputs import check_output_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``prepare`` command."""
    r = sub.add_parser("prepare", help="make a training folder from an offline dataset")
    r.add_argument("dataset", choices=["fashion-mnist", "emoji"])
    r.add_argument("out", help="output folder")
    r.add_argument("--limit", type=positive_int, help="at most this many images (per split)")
    r.add_argument("--size", type=positive_int, default=128, help="emoji: image size in px")


@command("prepare")
def cmd_prepare(args: argparse.Namespace) -> int:
    from imagen.data.prepare import prepare_emoji, prepare_fashion_mnist

    check_output_dir(args.out, "OUT")
    if args.dataset == "fashion-mnist":
        counts = prepare_fashion_mnist(args.out, limit=args.limit)
    else:
        counts = prepare_emoji(args.out, size=args.size, limit=args.limit)
    print(f"wrote {args.out}: {counts}")
    return 0
