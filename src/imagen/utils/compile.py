"""``torch.compile`` with a clean eager fallback."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


class CompileFallback:
    """Calls ``torch.compile(fn)`` (a module or a function); if compiling fails (no compiler, an
    unsupported op), warns once and runs ``fn`` eagerly from then on."""

    def __init__(self, fn: Callable[..., torch.Tensor], **options: Any) -> None:
        self.eager = fn
        self.compiled: Callable[..., torch.Tensor] | None = torch.compile(fn, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - reported, then the eager path runs
                log.warning("torch.compile failed (%s: %s); running eagerly", type(e).__name__, e)
                self.compiled = None
        return self.eager(*args, **kwargs)
