"""``imagen verify MODEL_DIR``: every file of a model directory hashed again in full, and its
stages' weights checked against their networks (what loading checks, without the stamps that
stand in for a full hash of large files)."""

from __future__ import annotations

import argparse
import time

from imagen.cli.common import command


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``verify`` command."""
    v = sub.add_parser(
        "verify",
        help="rehash every file of a model directory in full and check its weights",
        description="Hash every file model_index.json records in full (large weights files are "
        "otherwise known by a stamp after their first check) and compare each stage's weights "
        "with its network. Exit status 0 when all match, 2 naming the files that do not.",
    )
    v.add_argument("model_dir", metavar="MODEL_DIR", help="model directory to verify")


@command("verify")
def cmd_verify(args: argparse.Namespace) -> int:
    from imagen.models.model_dir import verify_model_dir

    t0 = time.perf_counter()
    files, size = verify_model_dir(args.model_dir)
    took = time.perf_counter() - t0
    print(
        f"verified {args.model_dir}: {files} file(s), {size / 2**20:.1f} MiB, all match their "
        f"sha256 ({took:.1f} s)"
    )
    return 0
