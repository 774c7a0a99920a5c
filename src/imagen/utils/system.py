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


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is fast here: a GPU with bf16 support, or a CPU with AVX-512 BF16
    or AMX instructions (elsewhere bf16 is emulated, and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device_type: str, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast at ``dtype`` on ``device_type`` (for example bf16), or off (float32) when
    ``dtype`` is None: the one switch every network call (training, sampling, distillation)
    goes through."""
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)
