"""The ``imagen`` command line: sample, upscale, train, export, embed, tune, distill, eval,
prepare, serve, demo, push, import, verify; and its one error boundary.

Every failure the user can cause and mend (bad arguments or config values, missing or damaged
files, unwritable outputs, a full disk, an unavailable device) is one line on stderr and exit
status 2. Anything else is a bug and keeps its traceback; ``IMAGEN_DEBUG=1`` shows the
traceback of every error.

Warnings and log lines come in the CLI's voice, ``imagen: warning: ...``, and never break a
progress bar (cli/messages.py).
"""

from __future__ import annotations

import argparse
import errno
import gc
import os
import sys

from imagen.cli import demo, distill, evaluate, hub, prepare, sample, serve, train, tune, verify
from imagen.cli.common import COMMANDS, Parser, UsageError
from imagen.cli.messages import cli_messages

COMMAND_MODULES = (sample, train, tune, distill, evaluate, prepare, serve, demo, hub, verify)
QUICK_START = ("sample", "upscale", "eval")
"""Commands whose start-up ends in ``load_pipeline`` (cli/common.py): the garbage collector is
paused until then and the objects made so far are frozen there (``gc.freeze``), since
importing torch and loading a model make objects that live until the process ends; walking
them again and again cost about a tenth of a cold ``imagen sample``. ``main(argv)`` called from
Python unfreezes them when the command returns."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (each command module adds its own)."""
    p = Parser(prog="imagen", description="Cascaded text-to-image diffusion (Imagen).")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_parser(sub)
    return p


def user_error(e: BaseException) -> str | None:
    """The one-line message of an error the user caused, or None for a bug."""
    if isinstance(e, (UsageError, ValueError)):  # incl. JSON, TOML, config and Unicode errors
        return one_line(str(e)) or type(e).__name__
    if isinstance(e, OSError):
        return os_error(e)
    if type(e).__name__ == "SafetensorError":
        return f"damaged or unreadable weights file ({one_line(str(e))})"
    if "yaml" in sys.modules and isinstance(e, sys.modules["yaml"].YAMLError):
        return f"invalid YAML: {one_line(str(e))}"
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return "out of memory: try a smaller --batch-size"
    return None


def os_error(e: OSError) -> str:
    """An I/O error on a user's path: what happened and where."""
    if e.strerror and e.filename is not None:
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        message = f"{where}: {e.strerror}"
    else:
        message = one_line(str(e)) or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        message += " (nothing was left half-written)"
    return message


def one_line(text: str, extra: int = 4) -> str:
    """A multi-line message folded onto one line (its first ``extra`` detail lines kept)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    details = lines[1 : 1 + extra] + (["..."] if len(lines) > 1 + extra else [])
    return " ".join([lines[0], "; ".join(details)]) if details else lines[0]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``imagen`` command: returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already reported on one line
        return e.code if isinstance(e.code, int) else 2
    with cli_messages(args.verbose):
        return run(args, called=argv is not None)


def run(args: argparse.Namespace, called: bool = False) -> int:
    """Run the parsed command inside the error boundary (``called``: from Python, not as the
    process)."""
    name = args.command + (f" {args.eval_kind}" if args.command == "eval" else "")
    if args.command in QUICK_START:
        gc.disable()  # back on in load_pipeline, or below if the command ends before it
    try:
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"imagen {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = user_error(e)
        if message is None or os.environ.get("IMAGEN_DEBUG", "") not in ("", "0"):
            raise
        print(f"imagen {name}: error: {message}", file=sys.stderr)
        return 2
    finally:
        gc.enable()
        if called:  # from Python, not as the process: its heap stays collectable
            gc.unfreeze()


if __name__ == "__main__":
    sys.exit(main())
