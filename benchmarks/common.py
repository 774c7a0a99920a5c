"""Shared helpers of the benchmark scripts: machine description, matmul peak, JSON output."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch

from imagen.utils.system import cpu_model_name

# where result files go (IMAGEN_BENCH_RESULTS overrides, e.g. to collect them from a remote run)
RESULTS = Path(os.environ.get("IMAGEN_BENCH_RESULTS") or Path(__file__).parent / "results")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {
        "cpu": cpu_model_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Any, device: torch.device, warmup: int = 2, repeat: int = 5, calls: int = 1) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls, over ``repeat`` timings of
    ``calls`` calls each (several calls between device syncs let a GPU run ahead of the host,
    as in a training loop)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / calls)
    return sorted(times)[len(times) // 2]


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    """Measured dense matrix-multiply throughput (FLOP/s) of this machine, the denominator of
    model FLOPs utilisation."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, warmup=2, repeat=7)
    return 2 * n**3 / seconds


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write(name: str, payload: dict[str, Any]) -> Path:
    """Write a result file benchmarks/results/NAME-DATE.json and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    day = _dt.date.today().isoformat()
    path = RESULTS / f"{name}-{day}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table of ``rows``."""

    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    for r in rows:
        lines.append(
            "  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(columns, widths, strict=True))
        )
    return "\n".join(lines)
