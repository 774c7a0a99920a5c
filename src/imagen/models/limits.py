"""Upper bounds of a stage's sizes, and the range check every network kind's config uses to
refuse an untrusted config (models/validate.py) before anything is built from it."""

from __future__ import annotations

from typing import Any

# Far above any real model (DeepFloyd IF-I-XL is 2816 wide at 64 px), low enough that a hostile
# config.json cannot ask for terabytes before it is refused.
MAX_WIDTH = 16384
MAX_IMAGE_SIZE = 8192
MAX_LEVELS = 12
MAX_BLOCKS = 64
MAX_TIMESTEPS = 100_000


def check_range(source: str, name: str, value: Any, low: float, high: float | None = None) -> None:
    """Raise a one-line ValueError naming ``source`` and ``name`` unless ``value`` (a number or
    a sequence of them) is at least ``low`` (and at most ``high``)."""
    values = value if isinstance(value, tuple | list) else (value,)
    for v in values:
        if v < low or (high is not None and v > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ValueError(f"{source}: {name} must be {bound}, got {v}")
