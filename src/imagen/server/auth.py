"""Who may talk to the server: ASGI middlewares for the Host-header allow-list (against DNS
rebinding, where a web page makes the user's browser drive a server on loopback) and for API
keys (``Authorization: Bearer KEY``, compared in constant time, never logged or echoed)."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from imagen.server.errors import send_error

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")
OPEN_PATHS = ("/", "/v1/health")  # the page (static HTML) and the health check need no key


def header_values(scope: dict, name: bytes) -> list[str]:
    """Every value of the request header ``name`` (lower case), in order."""
    return [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == name]


def split_host(value: str) -> tuple[str, str]:
    """A Host header as (name, port): ``[::1]:8000`` -> ("[::1]", "8000")."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value.partition("]")
        return name + "]", rest.removeprefix(":")
    name, _, port = value.partition(":") if value.count(":") == 1 else (value, "", "")
    return name, port


def allowed_hosts(bind: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The Host values the server answers: the loopback names (any port), the address it is
    bound to (unless a wildcard such as 0.0.0.0) and each of ``extra`` (``NAME`` for any port,
    ``NAME:PORT`` for one, ``*`` for any host)."""
    names = list(LOOPBACK_HOSTS)
    bound = f"[{bind}]" if ":" in bind and not bind.startswith("[") else bind
    if bind not in WILDCARD_ADDRESSES and bound.lower() not in names:
        names.append(bound.lower())
    return tuple(names) + tuple(h.strip().lower() for h in extra)


def host_allowed(header: str, allowed: tuple[str, ...]) -> bool:
    if "*" in allowed:
        return True
    name, port = split_host(header)
    return bool(name) and (name in allowed or f"{name}:{port}" in allowed)


class HostAllowList:
    """421 Misdirected Request for a Host header outside ``allowed`` (400 when it is missing)."""

    def __init__(self, app: Any, allowed: tuple[str, ...]) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        hosts = header_values(scope, b"host")
        if len(hosts) > 1:
            return await send_error(send, scope["path"], 400, "the request has two Host headers")
        host = hosts[0] if hosts else ""
        if not host:
            return await send_error(send, scope["path"], 400, "the request has no Host header")
        if not host_allowed(host, self.allowed):
            name = split_host(host)[0][:100]
            message = (
                f"Host {name!r} is not served here; start the server with --allowed-host {name} "
                "to accept it"
            )
            return await send_error(send, scope["path"], 421, message, "host_not_allowed")
        return await self.app(scope, receive, send)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class ApiKeys:
    """401 for a request without one of ``keys`` as ``Authorization: Bearer KEY``, on every
    route but the page and the health check. Digests of equal length are compared with
    :func:`hmac.compare_digest`, against every key, so the time says nothing about a key."""

    def __init__(self, app: Any, keys: tuple[str, ...]) -> None:
        self.app = app
        self.digests = [_digest(k) for k in keys]

    def valid(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        given, ok = _digest(token.strip()), False
        for d in self.digests:
            ok |= hmac.compare_digest(given, d)
        return ok

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = header_values(scope, b"authorization")
        if len(given) > 1:  # which one counts is the proxy's guess: refuse, never pick one
            message = f"the request has {len(given)} Authorization headers; send one"
            return await send_error(send, scope["path"], 400, message, "invalid_request")
        header = given[0] if given else ""
        if self.valid(header):
            return await self.app(scope, receive, send)
        message = "invalid API key" if header else "missing API key: send Authorization: Bearer KEY"
        extra = [(b"www-authenticate", b"Bearer")]
        return await send_error(send, scope["path"], 401, message, "invalid_api_key", extra)
