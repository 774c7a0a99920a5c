"""What a training run shows while it runs: the step statistics kept on the device between log
records, sample grids of the EMA model on fixed validation captions, loss curves, and
TensorBoard scalars when TensorBoard is installed."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from imagen.models.stage import Stage, resize
from imagen.text.encoders import TextEncoder
from imagen.training.data import collate
from imagen.utils.grid import captioned_grid
from imagen.utils.pil import tensor_to_pil
from imagen.utils.plot import curves_image


class StepStats:
    """Training statistics kept on the device between log records, so a step never waits for
    the host: the interval's loss sum and good steps, the last gradient norm, and the current
    and total runs of non-finite (skipped) steps."""

    FIELDS = ("loss_sum", "good", "norm", "bad_run", "bad_total")

    def __init__(self, device: torch.device, bad_total: int = 0) -> None:
        zero = torch.zeros((), device=device)
        self.loss, self.good, self.norm = zero.clone(), zero.clone(), zero.clone()
        self.bad_run, self.bad_total = zero.clone(), zero + bad_total

    def add(self, loss: Tensor, ok: Tensor, norm: Tensor | None) -> None:
        """Count one step: its loss and gradient norm where ``ok`` (finite), else a bad step."""
        okf = ok.float()
        self.loss += torch.where(ok, loss, torch.zeros_like(loss))
        self.good += okf
        if norm is not None:
            self.norm = torch.where(ok, norm.float(), self.norm)
        self.bad_run = (self.bad_run + 1) * (1 - okf)
        self.bad_total += 1 - okf

    def read(self) -> dict[str, float]:
        """Every statistic, read back in one transfer (the one sync of a log interval)."""
        values = torch.stack([self.loss, self.good, self.norm, self.bad_run, self.bad_total])
        return dict(zip(self.FIELDS, values.tolist(), strict=True))

    def new_interval(self) -> None:
        """Start a new log interval: the loss sum, good steps and norm back to zero."""
        for v in (self.loss, self.good, self.norm):
            v.zero_()


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
