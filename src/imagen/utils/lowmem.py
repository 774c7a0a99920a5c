"""Weights stored in bf16, computed in float32: how a model larger than memory in float32 runs
on a CPU without fast bf16 (no AVX-512 BF16 or AMX, where bf16 arithmetic is emulated and
many times slower). Each layer's low-precision parameters are upcast for its own call only
and dropped after it, so memory holds the bf16 weights plus one layer's float32 copy."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

LOW = (torch.bfloat16, torch.float16)


def _to32(x: Any) -> Any:
    return x.float() if isinstance(x, Tensor) and x.dtype in LOW else x


def _upcast(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple:
    module._stored = {  # type: ignore[assignment]
        n: p for n, p in module._parameters.items() if p is not None and p.dtype in LOW
    }
    for n, p in module._stored.items():  # type: ignore[union-attr]
        module._parameters[n] = p.detach().float()  # type: ignore[assignment]
    return tuple(_to32(a) for a in args), {k: _to32(v) for k, v in kwargs.items()}


def _restore(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
    module._parameters.update(module._stored)  # type: ignore[arg-type]
    del module._stored
    return output


def compute_in_float32(model: nn.Module) -> nn.Module:
    """Run ``model`` in float32 while its bf16/fp16 parameters stay stored as they are: every
    module holding such parameters upcasts them (and its floating inputs) for its call.
    Buffers are made float32 (they are small). Returns ``model``, marked with
    ``compute_dtype = torch.float32``."""
    for m in model.modules():
        for name, b in m._buffers.items():
            if b is not None and b.dtype in LOW:
                m._buffers[name] = b.float()
        if any(p is not None and p.dtype in LOW for p in m._parameters.values()):
            m.register_forward_pre_hook(_upcast, with_kwargs=True)
            m.register_forward_hook(_restore, with_kwargs=True)
    model.compute_dtype = torch.float32  # type: ignore[assignment]
    return model
