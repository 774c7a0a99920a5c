"""A small ``multipart/form-data`` reader for the OpenAI image routes (bodies are already
bounded by the server's body limit and held in memory): text fields and uploaded files."""

from __future__ import annotations

from dataclasses import dataclass, field
from email.message import Message

MAX_PARTS = 64
MAX_FIELD_CHARS = 100_000


@dataclass
class Form:
    """The fields of a form: text values, and files (name -> list of contents)."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[bytes]] = field(default_factory=dict)


def _param(value: str, name: str, header: str = "content-type") -> str | None:
    """Parameter ``name`` of a header value (``boundary``, ``name``, ``filename``)."""
    m = Message()
    m[header] = value
    got = m.get_param(name, header=header)
    return got if isinstance(got, str) else None


def _headers(block: bytes) -> dict[str, str]:
    out = {}
    for line in block.decode("utf-8", "replace").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def parse_form(body: bytes, content_type: str) -> Form:
    """The parts of ``body``; a ValueError (one line) when it is not a well-formed form, a
    text field repeats, or a text field is not UTF-8."""
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        raise ValueError("expected a multipart/form-data body")
    boundary = _param(content_type, "boundary")
    if not boundary or len(boundary) > 200:
        raise ValueError("the multipart/form-data body has no boundary")
    delimiter = b"\r\n--" + boundary.encode("latin-1", "replace")
    chunks = (b"\r\n" + body).split(delimiter)
    if len(chunks) < 2 or not chunks[-1].startswith(b"--"):
        raise ValueError("the multipart/form-data body is truncated or malformed")
    if len(chunks) - 2 > MAX_PARTS:
        raise ValueError(f"more than {MAX_PARTS} parts in the form")
    form = Form()
    for chunk in chunks[1:-1]:
        head, sep, content = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a form part has no headers")
        disposition = _headers(head).get("content-disposition", "")
        name = _param(disposition, "name", "content-disposition")
        if not name:
            raise ValueError("a form part has no name")
        if _param(disposition, "filename", "content-disposition") is not None:
            form.files.setdefault(name, []).append(content)
            continue
        if name in form.fields:
            raise ValueError(f"{name}: given twice")
        if len(content) > MAX_FIELD_CHARS:
            raise ValueError(f"{name}: longer than {MAX_FIELD_CHARS} bytes")
        try:
            form.fields[name] = content.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{name}: not UTF-8 text") from None
    return form
