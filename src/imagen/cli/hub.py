"""``imagen push``: upload a model directory to the Hugging Face Hub; ``imagen import``: make a
model directory of DeepFloyd IF pipelines and the Stable Diffusion x4 upscaler (diffusers
format)."""

from __future__ import annotations

import argparse

from imagen.cli.common import MODEL_OVERWRITE_HELP, UsageError, command, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``push`` command."""
    p = sub.add_parser("push", help="upload a model directory to the Hugging Face Hub")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="model directory to upload")
    p.add_argument("repo_id", metavar="REPO_ID", help="Hub repo, ORG/NAME (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    i = sub.add_parser(
        "import",
        help="make a model directory of DeepFloyd IF pipelines and the SD x4 upscaler",
        description="Import DeepFloyd IF stages: the IFPipeline first, then "
        "IFSuperResolutionPipeline(s), then optionally the Stable Diffusion x4 upscaler "
        "(StableDiffusionUpscalePipeline) as stage III, 256 -> 1024 px; or the x4 upscaler alone "
        "(a model for imagen upscale). Each is a folder or a Hub repo id (from the Hugging Face "
        "cache; HF_HUB_OFFLINE=1 is honoured). Weights are hard-linked (symlinked across file "
        "systems), not copied, unless --copy; the text encoders (T5, CLIP) are referenced.",
    )
    i.add_argument("sources", nargs="+", metavar="SRC", help="pipeline folder or Hub repo id")
    i.add_argument("--out", required=True, metavar="MODEL_DIR", help="model directory to write")
    i.add_argument("--copy", action="store_true", help="copy the U-Net weights into MODEL_DIR")
    i.add_argument(
        "--text-encoder",
        metavar="DIR",
        help="T5 encoder and tokenizer (a folder with both, or with text_encoder/ and "
        "tokenizer/); default: the first source's",
    )
    i.add_argument("--variant", help="weights variant to link, e.g. fp16 (default: the plain file)")
    i.add_argument(
        "--x4-size",
        type=positive_int,
        metavar="PX",
        help="the input size of an x4 upscaler imported alone (default 256: 1024 px out)",
    )
    i.add_argument("--overwrite", action="store_true", help=MODEL_OVERWRITE_HELP)


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


@command("import")
def cmd_import(args: argparse.Namespace) -> int:
    from imagen.utils.outputs import check_output_dir, sigterm_exits

    check_output_dir(args.out)  # writable, before anything is read
    from imagen.pipeline.diffusers_import import import_if

    with sigterm_exits():  # SIGTERM removes the half-written model beside --out, as Ctrl-C does
        out = import_if(
            args.sources,
            args.out,
            args.copy,
            args.text_encoder,
            args.variant,
            args.overwrite,
            x4_size=args.x4_size,
        )
    print(f"imported {len(args.sources)} stage(s) into {out}")
    return 0
