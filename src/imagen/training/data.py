"""What a training step consumes: batches of (image, caption) and every random draw of each
sample, as a pure function of (seed, global sample index).

Data come from the registered sources of :mod:`imagen.data.sources`. Map-style data (Shapes,
folders) are indexed by global sample number, and their random draws are made in the
DataLoader workers with the images, so the training process only moves finished batches to
the device. A run is therefore exactly resumable, and 2 processes with
batch B compute the same update as 1 process with batch 2B.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from imagen.data.config import DataConfig
from imagen.data.sources import Split, get_source
from imagen.models.stage import StageConfig, TrainingDraws
from imagen.training.config import TrainConfig
from imagen.training.parallel import Dist


# ---- per-sample randomness ---------------------------------------------------------------
def sample_generator(seed: int, index: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


@dataclass(frozen=True)
class DrawSpec:
    """What to draw for each sample: the image shape, the number of timesteps, the caption
    dropout rate, for super-resolution stages the augmentation range, and the number of extra
    uniform draws a distillation objective needs."""

    seed: int
    shape: tuple[int, ...]
    timesteps: int
    cond_drop: float
    aug_max: float | None  # None for base stages (no augmentation draws)
    uniforms: int = 0

    @classmethod
    def of(
        cls, stage: StageConfig, cfg: TrainConfig, timesteps: int, uniforms: int = 0
    ) -> DrawSpec:
        shape = (stage.unet.in_channels, stage.resolution, stage.resolution)
        aug = cfg.aug_max if stage.is_super_resolution else None
        return cls(cfg.seed, shape, timesteps, cfg.cond_drop, aug, uniforms)


Draws = tuple[Tensor | None, ...]  # one sample's draws, in TrainingDraws' field order


def draw_sample(spec: DrawSpec, index: int) -> Draws:
    """Every random draw of global sample ``index``: timestep, noise, caption drop, then (SR
    only) augmentation level and noise, then (distillation only) uniforms. Later draws never
    change earlier ones."""
    g = sample_generator(spec.seed, index)
    t = torch.randint(0, spec.timesteps, (1,), generator=g)
    noise = torch.randn(spec.shape, generator=g)
    drop = torch.rand(1, generator=g) < spec.cond_drop
    level = aug_noise = u = None
    if spec.aug_max is not None:
        level = torch.rand(1, generator=g) * spec.aug_max
        aug_noise = torch.randn(spec.shape, generator=g)
    if spec.uniforms:
        u = torch.rand(1, spec.uniforms, generator=g)
    return t, noise, drop, level, aug_noise, u


# per field of TrainingDraws: per-sample rows to concatenate (True) or images to stack
_CONCATENATED = (True, False, True, True, False, True)


def stack_draws(rows: list[Draws]) -> TrainingDraws:
    """The draws of a batch from the draws of its samples."""
    cols = zip(*rows, strict=True)
    return TrainingDraws(
        *(
            None if col[0] is None else (torch.cat(col) if cat else torch.stack(col))
            for col, cat in zip(cols, _CONCATENATED, strict=True)
        )
    )


def draw_noise(spec: DrawSpec, indices: list[int]) -> TrainingDraws:
    """The draws of the given global sample indices (independent of batching)."""
    return stack_draws([draw_sample(spec, i) for i in indices])


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


class WithDraws(Dataset):
    """Item i (a global sample index) is item ``i % length`` of ``dataset`` (i itself for an
    unbounded dataset) with the random draws of sample i appended."""

    def __init__(self, dataset: Dataset, spec: DrawSpec, length: int | None) -> None:
        self.dataset, self.spec, self.length = dataset, spec, length

    def __len__(self) -> int:
        return self.length or len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index % self.length if self.length else index]
        return (*item, draw_sample(self.spec, index))


# ---- batches -----------------------------------------------------------------------------
class StepBatchSampler(Sampler[list[int]]):
    """Yields this process's global sample indices for each (step, micro-batch) from
    ``start_step`` on: global step s covers indices [s G, (s + 1) G), G = batch x accum x
    world, interleaved so that the split across processes does not change which samples a step
    sees."""

    def __init__(
        self, batch: int, accum: int, dist_info: Dist, start_step: int, max_steps: int
    ) -> None:
        self.batch, self.accum, self.d = batch, accum, dist_info
        self.start, self.stop = start_step, max_steps

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accum

    def __iter__(self) -> Iterator[list[int]]:
        g = self.batch * self.accum * self.d.world
        for step in range(self.start, self.stop):
            for m in range(self.accum):
                base = step * g + (m * self.d.world + self.d.rank) * self.batch
                yield list(range(base, base + self.batch))


Batch = tuple[Tensor, list[str], Counter[str], TrainingDraws | None]


def collate(batch: list[tuple[Any, ...]]) -> tuple[Tensor, list[str], Counter[str]]:
    """Stack a batch of (image, caption, notes); the notes count the records skipped or
    converted to make it (an item with an empty image carries only such counts)."""
    notes = Counter(n for item in batch for n in item[2])
    kept = [item for item in batch if item[0].numel()]
    if not kept:
        return torch.empty(0), [], notes
    return torch.stack([item[0] for item in kept]), [item[1] for item in kept], notes


def collate_with_draws(batch: list[tuple[Any, ...]]) -> Batch:
    """:func:`collate` for items that carry their random draws (from :class:`WithDraws`)."""
    images, captions, notes = collate(batch)
    kept = [item[3] for item in batch if item[0].numel()]
    return images, captions, notes, stack_draws(kept) if kept else None


def _loader(dataset: Dataset, data: DataConfig, pin: bool, **kwargs: Any) -> DataLoader:
    workers = data.num_workers
    extra = {"prefetch_factor": 4} if workers else {}
    return DataLoader(dataset, num_workers=workers, pin_memory=pin, **extra, **kwargs)


def training_batches(
    data: DataConfig,
    stage: StageConfig,
    cfg: TrainConfig,
    d: Dist,
    start_step: int,
    spec: DrawSpec,
    pin_memory: bool = False,
) -> tuple[Iterator[Batch], Dataset]:
    """This process's micro-batches from ``start_step`` on (with their random draws), and the
    dataset behind them.

    Map-style data are indexed by global sample number, so a resumed run sees exactly the
    samples it would have seen. Streams (WebDataset shards) are read in passes: a resumed run
    starts a new pass over its shards (the pass number reshuffles them)."""
    kind = get_source(data.kind)
    prep = data.preprocess(stage.resolution)
    if not kind.stream:
        dataset = kind.open(data, prep, Split(d.rank, d.world))
        length = len(dataset) if kind.bounded else None  # type: ignore[arg-type]
        sampler = StepBatchSampler(cfg.batch_size, cfg.grad_accum, d, start_step, cfg.max_steps)
        loader = _loader(
            WithDraws(dataset, spec, length),
            data,
            pin_memory,
            batch_sampler=sampler,
            collate_fn=collate_with_draws,
        )
        return iter(loader), dataset

    def one_pass(epoch: int) -> Dataset:
        return kind.open(data, prep, Split(d.rank, d.world, epoch))

    return _stream(one_pass, data, cfg, start_step, pin_memory), one_pass(0)


def _stream(
    source: Callable[[int], Dataset], data: DataConfig, cfg: TrainConfig, start: int, pin: bool
) -> Iterator[Batch]:
    """Full batches from passes over a WebDataset source (draws are made by the trainer)."""
    epoch, carry = start, Counter()
    while True:
        produced = False
        for images, captions, notes in _loader(
            source(epoch), data, pin, batch_size=cfg.batch_size, collate_fn=collate
        ):
            carry.update(notes)
            if len(captions) < cfg.batch_size:  # a short last batch: only its counts are kept
                continue
            produced = True
            yield images, captions, carry, None
            carry = Counter()
        if not produced:
            raise ValueError(
                f"no full batch of usable samples in {data.path} (skipped: {dict(carry)})"
            )
        epoch += 1
