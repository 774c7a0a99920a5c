"""What a training step consumes: batches of (image, caption) and every random draw of each
sample, as a pure function of (seed, global sample index).

Data come from the registered sources of :mod:`imagen.data.sources`. Map-style data (Shapes,
folders) are indexed by global sample number, so a resumed run sees exactly the samples it
would have seen. The random draws (timestep, noise, caption drop, augmentation) are made on the
training device by a counter-based generator (:mod:`imagen.utils.rng`): a few vectorised
kernels per batch, nothing for the DataLoader workers to make or copy. A run is therefore
exactly resumable, and 2 processes with batch B compute the same update as 1 process with
batch 2B.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from imagen.data.config import DataConfig
from imagen.data.sources import Split, get_source
from imagen.models.stage import TrainingDraws
from imagen.models.stage_config import StageConfig
from imagen.training.config import TrainConfig
from imagen.training.parallel import Dist
from imagen.utils import rng


# ---- per-sample randomness ---------------------------------------------------------------
@dataclass(frozen=True)
class DrawSpec:
    """What to draw for each sample: the image shape, the number of timesteps, the caption
    dropout rate, for super-resolution stages the augmentation range, and the number of extra
    uniform draws a distillation objective needs."""

    seed: int
    shape: tuple[int, ...]  # one sample's diffused tensor (an image, or a VAE's latents)
    timesteps: int
    cond_drop: float
    aug_max: float | None  # None for base stages (no augmentation draws)
    uniforms: int = 0
    blur_max: float = 0.0  # SR stages: low-res blur sigmas drawn from [0, blur_max]; 0: none
    aug_shape: tuple[int, ...] | None = None  # SR: the low-res image's noise (None: ``shape``)

    @classmethod
    def of(
        cls, stage: StageConfig, cfg: TrainConfig, timesteps: int, uniforms: int = 0
    ) -> DrawSpec:
        sr = stage.is_super_resolution
        aug, blur = (cfg.aug_max, cfg.blur_max) if sr else (None, 0.0)
        aug_shape = stage.lowres_shape if sr and stage.lowres_shape != stage.sample_shape else None
        return cls(
            cfg.seed, stage.sample_shape, timesteps, cfg.cond_drop, aug, uniforms, blur, aug_shape
        )

    def positions(self, device: torch.device) -> Tensor:
        """Positions 0..n-1 of the longest random stream, for :func:`draw_batch` in a compiled
        graph (see :func:`imagen.utils.rng.bits`)."""
        longest = max(math.prod(self.shape), math.prod(self.aug_shape or ()), self.uniforms, 1)
        return torch.arange(longest, device=device)


# the random streams of a sample (each a separate counter range of its generator)
_T, _NOISE, _DROP, _LEVEL, _AUG_NOISE, _UNIFORMS, _BLUR = range(7)


def draw_batch(
    spec: DrawSpec,
    first: int | Tensor,
    count: int,
    device: torch.device,
    positions: Tensor | None = None,
) -> TrainingDraws:
    """Every random draw of global samples ``first .. first + count - 1``, made on ``device``:
    timestep, noise, caption drop, then (SR only) augmentation level and noise, then
    (distillation only) uniforms, then (SR with ``blur_max``) the low-res blur. Each is a pure function of (seed, sample index): the same
    whatever the batching, the process split or the device. In a compiled step ``first`` is a
    0-d tensor on ``device`` (one graph serves every batch) and ``positions`` is
    ``spec.positions(device)``, made outside the graph."""
    indices = torch.arange(count, device=device, dtype=torch.int64) + first
    states = rng.sample_states(spec.seed, indices)
    size = math.prod(spec.shape)

    def n(k: int) -> rng.Positions:
        return k if positions is None else positions[:k]

    t = rng.integers(states, _T, spec.timesteps)
    noise = rng.normal(states, _NOISE, n(size)).view(count, *spec.shape)
    drop = rng.uniform(states, _DROP, n(1))[:, 0] < spec.cond_drop
    level = aug_noise = u = blur = None
    if spec.aug_max is not None:
        level = rng.uniform(states, _LEVEL, n(1))[:, 0] * spec.aug_max
        aug_shape = spec.aug_shape or spec.shape
        aug_noise = rng.normal(states, _AUG_NOISE, n(math.prod(aug_shape))).view(count, *aug_shape)
    if spec.uniforms:
        u = rng.uniform(states, _UNIFORMS, n(spec.uniforms))
    if spec.blur_max > 0 and spec.aug_max is not None:
        blur = rng.uniform(states, _BLUR, n(1))[:, 0] * spec.blur_max
    return TrainingDraws(t, noise, drop, level, aug_noise, u, blur)


# ---- datasets ----------------------------------------------------------------------------
def make_dataset(data: DataConfig, stage: StageConfig, training: bool = True) -> Dataset:
    """The map-style dataset a stage trains on, yielding (image in [-1, 1] at the stage's
    resolution, caption, notes on records skipped or converted to produce it)."""
    kind = get_source(data.kind)
    if kind.stream:
        raise ValueError(f"data kind {data.kind!r} is a stream, not map-style; use its loader")
    return kind.open(data, data.preprocess(stage.resolution, training), Split())


def dataset_captions(data: DataConfig) -> list[str]:
    """Every caption a training run on ``data`` can see (for the embedding cache)."""
    return get_source(data.kind).captions(data)


# ---- batches -----------------------------------------------------------------------------
class StepBatchSampler(Sampler[list[int]]):
    """Yields this process's global sample indices for each (step, micro-batch) from
    ``start_step`` on: global step s covers indices [s G, (s + 1) G), G = batch x accum x
    world, interleaved so that the split across processes does not change which samples a step
    sees. With a dataset ``length``, index i reads item i mod length (the epochs repeat)."""

    def __init__(
        self,
        batch: int,
        accum: int,
        dist_info: Dist,
        start_step: int,
        max_steps: int,
        length: int | None = None,
    ) -> None:
        self.batch, self.accum, self.d = batch, accum, dist_info
        self.start, self.stop, self.length = start_step, max_steps, length

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accum

    def __iter__(self) -> Iterator[list[int]]:
        g = self.batch * self.accum * self.d.world
        for step in range(self.start, self.stop):
            for m in range(self.accum):
                base = step * g + (m * self.d.world + self.d.rank) * self.batch
                indices = range(base, base + self.batch)
                yield [i % self.length for i in indices] if self.length else list(indices)


Batch = tuple[Tensor, list[str], Counter[str]]


def collate(batch: list[tuple[Any, ...]]) -> tuple[Tensor, list[str], Counter[str]]:
    """Stack a batch of (image, caption, notes); the notes count the records skipped or
    converted to make it (an item with an empty image carries only such counts)."""
    notes = Counter(n for item in batch for n in item[2])
    kept = [item for item in batch if item[0].numel()]
    if not kept:
        return torch.empty(0), [], notes
    # default_collate stacks into shared memory in a DataLoader worker (no copy to send it)
    return default_collate([item[0] for item in kept]), [item[1] for item in kept], notes


def loader_workers(data: DataConfig, gpu: bool) -> int:
    """DataLoader workers per training process: ``data.num_workers``, or when it is None none on
    CPUs (their cores run the training step) and on a GPU the host's cores per local process
    less two (the training process and its pinning thread), at most 16."""
    if data.num_workers is not None:
        return data.num_workers
    if not gpu:
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(16, len(os.sched_getaffinity(0)) // max(1, local) - 2))


def make_loader(dataset: Dataset, data: DataConfig, pin: bool, **kwargs: Any) -> DataLoader:
    """The trainer's DataLoader over ``dataset``: its workers (:func:`loader_workers`), page-
    locked batches on a GPU (``pin``) and four batches prefetched per worker."""
    workers = loader_workers(data, gpu=pin)
    extra = {"prefetch_factor": 4} if workers else {}
    return DataLoader(dataset, num_workers=workers, pin_memory=pin, **extra, **kwargs)


def training_batches(
    data: DataConfig,
    stage: StageConfig,
    cfg: TrainConfig,
    d: Dist,
    start_step: int,
    pin_memory: bool = False,
) -> tuple[Iterator[Batch], Dataset]:
    """This process's micro-batches from ``start_step`` on, and the dataset behind them (the
    trainer makes each batch's random draws with :func:`draw_batch`).

    Map-style data are indexed by global sample number, so a resumed run sees exactly the
    samples it would have seen. Streams (WebDataset shards) are read in passes: a resumed run
    starts a new pass over its shards (the pass number reshuffles them)."""
    kind = get_source(data.kind)
    prep = data.preprocess(stage.resolution)
    if not kind.stream:
        dataset = kind.open(data, prep, Split(d.rank, d.world))
        length = len(dataset) if kind.bounded else None  # type: ignore[arg-type]
        sampler = StepBatchSampler(
            cfg.batch_size, cfg.grad_accum, d, start_step, cfg.max_steps, length
        )
        loader = make_loader(dataset, data, pin_memory, batch_sampler=sampler, collate_fn=collate)
        return iter(loader), dataset

    def one_pass(epoch: int) -> Dataset:
        return kind.open(data, prep, Split(d.rank, d.world, epoch))

    return _stream(one_pass, data, cfg, start_step, pin_memory), one_pass(0)


def _stream(
    source: Callable[[int], Dataset], data: DataConfig, cfg: TrainConfig, start: int, pin: bool
) -> Iterator[Batch]:
    """Full batches from passes over a WebDataset source."""
    epoch, carry = start, Counter()
    while True:
        produced = False
        for images, captions, notes in make_loader(
            source(epoch), data, pin, batch_size=cfg.batch_size, collate_fn=collate
        ):
            carry.update(notes)
            if len(captions) < cfg.batch_size:  # a short last batch: only its counts are kept
                continue
            produced = True
            yield images, captions, carry
            carry = Counter()
        if not produced:
            raise ValueError(
                f"no full batch of usable samples in {data.path} (skipped: {dict(carry)})"
            )
        epoch += 1
