"""What the code runs on, for logs and benchmark reports."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_description(device: torch.device) -> str:
    """A short description of where training runs (GPU name and count, or CPU and threads)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} x{int(os.environ.get('WORLD_SIZE', '1'))}"
    return f"{cpu_model_name()}, {torch.get_num_threads()} thread(s)"
