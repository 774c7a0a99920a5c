"""Error answers in the two shapes the server speaks: ``{"detail": ...}`` on its own routes and
OpenAI's ``{"error": {"message", "type", "param", "code"}}`` on the OpenAI-compatible ones
(``/v1/images/...`` and ``/v1/models...``), whose clients read that shape."""

from __future__ import annotations

import json
from typing import Any

DISCONNECTED = 499  # nginx's "client closed request"
OPENAI_PREFIXES = ("/v1/images/", "/v1/models")

# the error types OpenAI's API names by status (its SDK maps the status to an exception class)
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    421: "invalid_request_error",
    429: "rate_limit_error",
}


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIXES) or path == "/v1/images"


class OpenAIError(Exception):
    """An error answered in OpenAI's shape (raised by the OpenAI-compatible routes)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def content(self) -> dict[str, Any]:
        return openai_error(self.status, self.message, self.param, self.code)


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_content(path: str, status: int, message: str, code: str | None = None) -> Any:
    """The error body for ``path``: OpenAI's shape on its routes, ``{"detail"}`` elsewhere."""
    if is_openai_path(path):
        return openai_error(status, message, None, code)
    return {"detail": message}


async def send_error(
    send: Any, path: str, status: int, message: str, code: str | None = None, extra: Any = ()
) -> None:
    """Answer an ASGI request with an error (for middlewares, before the app sees it)."""
    body = json.dumps(error_content(path, status, message, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers + [*extra]})
    await send({"type": "http.response.body", "body": body})


def describe_errors(errors: Any) -> tuple[str, str | None]:
    """Pydantic's validation errors as one line naming the fields ("steps: ...; prompt: ..."),
    and the first field's name."""
    names, first = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden":
            msg = "unknown parameter"
        names.append(f"{'.'.join(loc) or 'body'}: {msg}")
        first = first or ".".join(loc) or None
    return "; ".join(names), first
