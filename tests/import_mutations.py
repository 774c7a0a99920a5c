"""Mutations of a valid diffusers pipeline folder pair (the tiny IF pipelines of if_tiny.py),
and the rule every mutant must keep: ``imagen import`` refuses it with one line (exit status
2, no traceback, nothing written), or imports it and the model samples. Used by
tests/test_reliability_import.py (a bounded, seeded fuzz) and benchmarks/import_fuzz.py (a
larger one)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import traceback
from pathlib import Path
from typing import Any

HOSTILE_VALUES: list[Any] = [
    -1,
    0,
    1,
    10**9,
    2**63,
    1e308,
    -0.5,
    0.5,
    "wide",
    "",
    None,
    True,
    [],
    {},
    [1] * 100,
    [[[[1]]]],
    "x" * 10_000,
    {"a": {"b": {"c": 1}}},
]


def copy_pipelines(src: Path, dst: Path) -> tuple[Path, Path]:
    """A fresh copy of the base and super-resolution folders ``src/if-i``, ``src/if-ii``."""
    dst.mkdir(parents=True, exist_ok=True)
    return tuple(  # type: ignore[return-value]
        Path(shutil.copytree(src / name, dst / name)) for name in ("if-i", "if-ii")
    )


def edit_json(path: Path, change: Any) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


# ---- one random mutation -----------------------------------------------------------------
def _json_value(rng: random.Random, path: Path) -> str:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not data:
        return "skip"
    key = rng.choice(sorted(data))
    old = data[key]
    if isinstance(old, int) and not isinstance(old, bool) and rng.random() < 0.4:
        new: Any = rng.choice([old * 2, old * 1000, old + 1, old - 1, -old])
    elif isinstance(old, list) and old and rng.random() < 0.5:
        new = old[: rng.randrange(len(old))] + old[:1] * rng.randrange(3)
    else:
        new = rng.choice(HOSTILE_VALUES)
    data[key] = new
    path.write_text(json.dumps(data))
    return f"{key}={str(new)[:40]}"


def _json_key(rng: random.Random, path: Path) -> str:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not data:
        return "skip"
    if rng.random() < 0.5:
        key = rng.choice(sorted(data))
        del data[key]
        what = f"del {key}"
    else:
        data["not_a_field"] = 1
        what = "unknown key"
    path.write_text(json.dumps(data))
    return what


def _json_whole(rng: random.Random, path: Path) -> str:
    kind = rng.choice(["garbage", "empty", "list", "deep", "null", "huge"])
    if kind == "huge":
        with open(path, "wb") as f:
            f.truncate(100 << 20)  # sparse: costs nothing, claims 100 MB
        return kind
    body = {
        "garbage": b"\x00\xff not json",
        "empty": b"",
        "list": b"[1, 2, 3]",
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "null": b"null",
    }[kind]
    path.write_bytes(body)
    return kind


def _binary(rng: random.Random, path: Path) -> str:
    data = bytearray(path.read_bytes())
    kind = rng.choice(["truncate", "header-byte", "data-byte", "zero", "length", "append"])
    header = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    if kind == "truncate":
        data = data[: rng.randrange(len(data))]
    elif kind == "header-byte" and header:
        i = rng.randrange(8, 8 + header)
        data[i] = rng.randrange(256)
    elif kind == "data-byte" and len(data) > 8 + header:
        i = rng.randrange(8 + header, len(data))
        data[i] ^= 1 << rng.randrange(8)
    elif kind == "zero":
        data = bytearray()
    elif kind == "length":
        data[:8] = rng.choice([0, 1, header + 1, header - 1, 2**31, 2**60]).to_bytes(8, "little")
    else:
        data += os.urandom(rng.randrange(1, 64))
    path.write_bytes(bytes(data))
    return kind


def _filesystem(rng: random.Random, path: Path) -> str:
    kind = rng.choice(["delete", "passwd", "sibling", "directory", "fifo", "dangling"])
    path.unlink()
    if kind == "passwd":
        path.symlink_to("/etc/passwd")
    elif kind == "sibling":
        others = [p for p in path.parent.iterdir() if p.is_file()]
        if others:
            path.symlink_to(rng.choice(others).name)
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dangling":
        path.symlink_to(path.parent / "nowhere")
    return kind


def random_mutation(rng: random.Random, base: Path, sr: Path) -> str:
    """Apply one random mutation to the pipeline pair; returns what it did."""
    candidates = files(base) + files(sr)
    jsons = [p for p in candidates if p.suffix == ".json" and p.stat().st_size < 100_000]
    weights = [p for p in candidates if p.suffix == ".safetensors"]
    op = rng.choices(
        [_json_value, _json_key, _json_whole, _binary, _filesystem], weights=[5, 2, 2, 3, 2]
    )[0]
    pool = weights if op is _binary else jsons if op is not _filesystem else candidates
    path = rng.choice(pool)
    what = op(rng, path)
    return f"{op.__name__.strip('_')} {path.relative_to(path.parents[2])}: {what}"


# ---- the rule ------------------------------------------------------------------------------
class Hang(BaseException):
    """A command ran past its time (not an Exception: the CLI's boundary does not catch it)."""


def _alarm(signum: int, frame: Any) -> None:
    raise Hang


def run_cli(argv: list[str], timeout: int = 60) -> tuple[int | None, str]:
    """``imagen ARGV`` in this process: its exit status and stderr (None and the traceback
    when an exception escaped the command's error boundary or it ran past ``timeout``)."""
    from imagen.cli.main import main

    err = io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except Hang:
        return None, err.getvalue() + f"\nHANG: over {timeout} s"
    except BaseException:  # noqa: BLE001 - the point: report it
        return None, err.getvalue() + "\n" + traceback.format_exc()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, err.getvalue()


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("imagen ") and "error:" in line]


def judge(base: Path, sr: Path, work: Path, sample: bool = True) -> dict[str, Any]:
    """Import the pair into ``work/model``; the outcome: refused (one line), imported (and
    sampled), or a failure of the rule (traceback, several lines, a sample that fails,
    something written by a refused import)."""
    out = work / "model"
    code, err = run_cli(["import", str(base), str(sr), "--out", str(out)])
    if code is None or "Traceback" in err:
        return {"outcome": "traceback", "detail": err[-2000:]}
    if code == 2:
        lines = error_lines(err)
        left = sorted(p.name for p in work.iterdir())
        if len(lines) != 1 or left:
            return {"outcome": "not one line or wrote", "detail": err[-2000:], "left": left}
        return {"outcome": "refused", "detail": lines[0]}
    if code != 0:
        return {"outcome": f"exit {code}", "detail": err[-2000:]}
    if not sample:
        return {"outcome": "imported"}
    images = work / "samples"
    code, err = run_cli(
        ["sample", "a red cat", "--model", str(out), "--steps", "1", "--out", str(images)]
    )
    if code != 0 or not (images / "0000.png").is_file():
        return {"outcome": "imported, sample failed", "detail": err[-2000:]}
    return {"outcome": "imported and sampled"}
