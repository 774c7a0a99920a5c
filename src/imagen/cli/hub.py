"""``imagen push``: upload a model directory to the Hugging Face Hub."""

from __future__ import annotations

import argparse

from imagen.cli.common import UsageError, command


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``push`` command."""
    p = sub.add_parser("push", help="upload a model directory to the Hugging Face Hub")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="model directory to upload")
    p.add_argument("repo_id", metavar="REPO_ID", help="Hub repo, ORG/NAME (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repo as private")


@command("push")
def cmd_push(args: argparse.Namespace) -> int:
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    from imagen.pipeline import push_model

    try:
        url = push_model(args.model_dir, args.repo_id, args.private)
    except (HfHubHTTPError, httpx.HTTPError) as e:
        raise UsageError(f"upload to {args.repo_id} failed: {str(e).splitlines()[0]}") from None
    print(f"uploaded {args.model_dir} to {url}")
    return 0
