"""What a training run shows while it runs: sample grids of the EMA model on fixed validation
captions, and TensorBoard scalars when TensorBoard is installed."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from imagen.data.shapes import tensor_to_pil
from imagen.models.stage import Stage, resize
from imagen.text.encoders import TextEncoder
from imagen.training.data import collate
from imagen.utils.grid import captioned_grid
from imagen.utils.plot import curves_image


def tensorboard_writer(out: Path) -> Any:
    """A TensorBoard writer into RUN_DIR/tensorboard when the tensorboard package is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def validation_batch(dataset: Any, n: int) -> tuple[Tensor, list[str]]:
    """The first ``n`` samples: fixed captions (and images) for the sample grids."""
    from torch.utils.data import IterableDataset

    items = (
        list(itertools.islice(iter(dataset), n))
        if isinstance(dataset, IterableDataset)
        else [dataset[i] for i in range(n)]
    )
    images, captions, _ = collate(items)
    return images, captions


@torch.no_grad()
def write_samples(
    stage: Stage,
    encoder: TextEncoder,
    val: tuple[Tensor, list[str]],
    path: Path,
    seed: int,
    write: bool = True,
) -> None:
    """Sample the validation captions with the EMA model (SR stages upsample the real
    low-res images) and save a grid: real images on top, samples below."""
    images, captions = val
    cfg = stage.config
    lowres = resize(images, cfg.lowres_size) if cfg.is_super_resolution else None
    gen = torch.Generator(device=stage.device).manual_seed(seed)
    out = stage.sample(encoder.encode(captions), lowres, generator=gen).clamp(-1, 1)
    if not write:
        return
    pics = [tensor_to_pil(x) for x in torch.cat([images.cpu(), out.cpu()])]
    captioned_grid(
        pics,
        ["(data) " + c for c in captions] + captions,
        columns=len(captions),
        tile=max(64, cfg.resolution),
    ).save(path)


def plot_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Training loss (log scale) and learning rate over steps, from the run's log records, as
    a PNG (written beside the log and updated as the run goes)."""
    steps = [float(r["step"]) for r in records]
    panels = [
        ("training loss (log scale) by step", (steps, [float(r["loss"]) for r in records]), True),
        ("learning rate by step", (steps, [float(r["lr"]) for r in records]), False),
    ]
    tmp = path.with_suffix(".tmp.png")
    curves_image(panels).save(tmp)
    tmp.replace(path)
