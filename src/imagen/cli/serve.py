"""``imagen serve``: the HTTP API and the web page."""

from __future__ import annotations

import argparse
import os
import socket

from imagen.cli.common import (
    MODEL_HELP,
    UsageError,
    add_lora_options,
    command,
    device,
    port,
    positive_int,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``serve`` command."""
    sv = sub.add_parser("serve", help="HTTP API and web page (binds 127.0.0.1 by default)")
    sv.add_argument(
        "--model",
        help=MODEL_HELP,
    )
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=port, default=8000)
    sv.add_argument(
        "--max-queue", type=positive_int, default=16, help="requests waiting or running"
    )
    sv.add_argument(
        "--max-batch-images", type=positive_int, default=8, help="images per forward pass"
    )
    sv.add_argument(
        "--max-body-mb", type=positive_int, default=8, help="largest request body, in MB"
    )
    sv.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require Authorization: Bearer KEY on every route but /v1/health and the page "
        "(repeatable; also IMAGEN_API_KEY, comma-separated, which keeps keys out of ps)",
    )
    sv.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host header to answer besides localhost, 127.0.0.1 and [::1] (NAME for any "
        "port, NAME:PORT for one, * for any; repeatable); other hosts get 421",
    )
    sv.add_argument("--device", type=device, default="cpu")
    sv.add_argument("--threads", type=positive_int)
    add_lora_options(sv)


def api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    """The keys of --api-key and IMAGEN_API_KEY (comma-separated), blanks refused."""
    keys = list(args.api_key)
    env = os.environ.get("IMAGEN_API_KEY")
    if env and env.strip():  # set but empty: no keys
        keys += env.split(",")
    keys = [k.strip() for k in keys]
    if any(not k for k in keys):
        raise UsageError("an API key (--api-key or IMAGEN_API_KEY) is empty")
    if any(len(k) < 8 or any(c.isspace() or not c.isprintable() for c in k) for k in keys):
        raise UsageError("API keys need at least 8 printable characters and no spaces")
    return tuple(dict.fromkeys(keys))


def check_port(host: str, number: int) -> None:
    """A UsageError unless ``host:number`` can be listened on."""
    try:
        infos = socket.getaddrinfo(host, number, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{number}: {e.strerror}") from None


@command("serve")
def cmd_serve(args: argparse.Namespace) -> int:
    from imagen.server.app import ServerConfig, serve

    keys = api_keys(args)
    if any(not h.strip() or any(c.isspace() for c in h.strip()) for h in args.allowed_host):
        raise UsageError("--allowed-host needs a host name (NAME, NAME:PORT or *)")
    check_port(args.host, args.port)
    serve(
        args.model,
        ServerConfig(
            host=args.host,
            port=args.port,
            max_queue=args.max_queue,
            max_batch_images=args.max_batch_images,
            max_body_bytes=args.max_body_mb * 1_000_000,
            api_keys=keys,
            allowed_hosts=tuple(args.allowed_host),
        ),
        args.device,
        lora=args.lora,
        fuse_lora=args.fuse,
    )
    return 0
