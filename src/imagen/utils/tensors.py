"""Loading and saving weights in safetensors, strictly: a checkpoint whose keys or shapes do not
match the model is a clear error listing the differences, never a silent partial load."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

WEIGHT_DTYPES = {
    "fp16": torch.float16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "int8": torch.int8,  # weight-only, one scale per output channel (see quantize_int8)
}
"""How weights can be stored, by the name the command line and configs use."""


def weights_dtype(name: str) -> torch.dtype:
    """The storage dtype called ``name`` (fp16, fp32, bf16 or int8)."""
    try:
        return WEIGHT_DTYPES[name]
    except KeyError:
        raise ValueError(
            f"unknown weights dtype {name!r}; choose one of {', '.join(WEIGHT_DTYPES)}"
        ) from None


def state_dict_differences(model: nn.Module, state: dict[str, Tensor]) -> list[str]:
    """Human-readable differences between a model's parameters and a state dict."""
    own = model.state_dict()
    diffs = [f"missing: {k}" for k in sorted(set(own) - set(state))]
    diffs += [f"unexpected: {k}" for k in sorted(set(state) - set(own))]
    for k in sorted(set(own) & set(state)):
        if tuple(own[k].shape) != tuple(state[k].shape):
            diffs.append(f"shape of {k}: model {tuple(own[k].shape)}, file {tuple(state[k].shape)}")
    return diffs


def load_strict(
    model: nn.Module, state: dict[str, Tensor], source: str = "checkpoint", assign: bool = False
) -> None:
    """Load ``state`` into ``model`` or raise listing every missing, unexpected or misshapen key;
    ``assign`` takes the tensors themselves (for a model built on the meta device)."""
    check_state(model, state, source)
    model.load_state_dict(state, strict=True, assign=assign)


def check_state(model: nn.Module, state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Raise, listing every missing, unexpected or misshapen key, unless ``state`` fits ``model``."""
    diffs = state_dict_differences(model, state)
    if diffs:
        shown = "\n  ".join(diffs[:20])
        more = f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else ""
        raise ValueError(
            f"{source} does not match the model configuration ({len(diffs)} difference(s)):\n"
            f"  {shown}{more}"
        )


def save_tensors(tensors: dict[str, Tensor], path: Path, dtype: torch.dtype | None = None) -> None:
    """Write tensors to a safetensors file (contiguous, on CPU, optionally cast, fsynced)."""
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous()
    save_file(out, str(path))
    os.chmod(path, _FILE_MODE)  # safetensors creates owner-only files; models are for sharing
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _file_mode() -> int:
    """The mode a new file gets from this process's umask (0o644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


def load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Read a safetensors file (never pickle)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return load_file(str(path), device=str(device))


SCALE_SUFFIX = ".int8_scale"


def quantize_int8(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Weight-only int8 with one fp16 scale per output channel (absmax / 127) for every floating
    tensor of two or more dimensions (conv and linear weights); the rest (biases, norms) in
    fp16. Halves the size of an fp16 export, for shipping small models."""
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if v.is_floating_point() and v.ndim >= 2:
            flat = v.detach().float().flatten(1)
            scale = (flat.abs().amax(1) / 127).clamp(min=1e-12)
            out[k] = (
                (flat / scale[:, None]).round().clamp(-127, 127).to(torch.int8).reshape(v.shape)
            )
            out[k + SCALE_SUFFIX] = scale.to(torch.float16)
        else:
            out[k] = v.detach().to(torch.float16) if v.is_floating_point() else v
    return out


def dequantize(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The float32 state dict of a (possibly) int8-quantized one (see :func:`quantize_int8`)."""
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if k.endswith(SCALE_SUFFIX):
            continue
        scale = state.get(k + SCALE_SUFFIX)
        if scale is not None:
            out[k] = (v.float().flatten(1) * scale.float()[:, None]).reshape(v.shape)
        else:
            out[k] = v.float() if v.is_floating_point() else v
    return out


def load_weights(path: Path, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """A weights file's state dict with its floating tensors in ``dtype`` (int8 weight-only
    files dequantised): stored tensors already in ``dtype`` are used as they are, so a bf16
    file loaded in bf16 is never copied to float32."""
    state = load_tensors(path)
    if any(k.endswith(SCALE_SUFFIX) for k in state):
        state = dequantize(state)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
