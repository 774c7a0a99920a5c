"""Bootstrap intervals of a mean, for CLIP scores and paired differences of them.

The percentile bootstrap (Efron and Tibshirani 1993, ch. 13): the mean is recomputed on
``resamples`` samples drawn with replacement, and the interval is the central ``level`` of
those means. With ``clusters`` (the prompt of each image), whole clusters are drawn, so the
images of one prompt, which are not independent of each other, count as one draw: the
interval is then about the prompts a suite stands for, not only the seeds that were drawn.
Seeded, so a report is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

RESAMPLES = 10_000
CHUNK = 500  # resamples drawn at once (bounds memory: CHUNK x clusters indices)


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap interval (None when fewer than two clusters were drawn from)."""

    mean: float
    low: float | None
    high: float | None
    count: int  # values
    clusters: int  # independent draws (prompts)

    def to_dict(self, level: float = 0.95) -> dict[str, Any]:
        key = f"ci{round(level * 100)}"
        low = None if self.low is None else round(self.low, 4)
        high = None if self.high is None else round(self.high, 4)
        return {"mean": round(self.mean, 4), key: [low, high]}

    def covers(self, value: float) -> bool:
        return self.low is not None and self.high is not None and self.low <= value <= self.high


def bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    clusters: Sequence[Any] | None = None,
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Interval:
    """The mean of ``values`` with its percentile bootstrap interval at ``level``; with
    ``clusters`` (one label per value) clusters are resampled whole (see the module doc)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or not len(v):
        raise ValueError("bootstrap_mean needs a non-empty list of numbers")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if clusters is None:
        sums, counts = v, np.ones_like(v)
    else:
        if len(clusters) != len(v):
            raise ValueError(f"{len(clusters)} cluster labels for {len(v)} values")
        _, codes = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
        sums, counts = np.bincount(codes, weights=v), np.bincount(codes).astype(np.float64)
    k = len(sums)
    if k < 2:
        return Interval(float(v.mean()), None, None, len(v), k)
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, resamples, CHUNK):
        idx = rng.integers(0, k, size=(min(CHUNK, resamples - start), k))
        means.append(sums[idx].sum(1) / counts[idx].sum(1))
    tail = (1 - level) / 2
    low, high = np.quantile(np.concatenate(means), [tail, 1 - tail])
    return Interval(float(v.mean()), float(low), float(high), len(v), k)
