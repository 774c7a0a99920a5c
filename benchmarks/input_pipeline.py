"""The Shapes input pipeline on this machine's CPU: what one DataLoader worker costs per sample.

Per sample, on one thread: the scene draw alone, rendering as the specification states it (the
whole SUPERSAMPLE x canvas box-filtered, then converted), the dataset's item-by-item path and
its batched path (``__getitems__``, what a DataLoader worker calls for a batch). Then the
DataLoader's samples/s with 1 and 2 workers for the batched path and for the same dataset with
the batched path hidden (item by item). One run, so the ratios compare like with like.
Writes benchmarks/results/input_pipeline-cpu-DATE.json.

    python benchmarks/input_pipeline.py [--size 32] [--batch 256]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from common import table, write
from PIL import Image, ImageDraw

from imagen.data.config import DataConfig
from imagen.data.shapes import BACKGROUND, PALETTE, SUPERSAMPLE, Scene, ShapesDataset, draw_shape
from imagen.models.presets import get_preset
from imagen.training.config import TrainConfig
from imagen.training.data import collate, make_loader
from imagen.utils.pil import pil_to_tensor


def whole_canvas(scene: Scene, size: int) -> torch.Tensor:
    """The specification's rendering, literally: every canvas pixel filtered."""
    big = Image.new("RGB", (size * SUPERSAMPLE,) * 2, BACKGROUND)
    for obj in scene.objects:
        draw_shape(ImageDraw.Draw(big), obj, size * SUPERSAMPLE, PALETTE[obj.color])
    return pil_to_tensor(big.resize((size, size), Image.BOX))


class ItemByItem(torch.utils.data.Dataset):
    """The dataset without its batched path (how the DataLoader reads other sources)."""

    def __init__(self, ds: ShapesDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        return self.ds[i]


def per_sample_us(fn: Any, n: int, repeat: int = 5) -> float:
    """Best of ``repeat`` timings of ``fn()``, in microseconds per sample (``fn`` makes n)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def loader_samples_per_s(ds: Any, workers: int, batch: int, batches: int) -> float:
    """samples/s of a DataLoader over ``ds`` with ``workers`` workers, after a warm-up."""
    sampler = [list(range(b * batch, (b + 1) * batch)) for b in range(batches + 4 * workers + 2)]
    data = DataConfig(num_workers=workers)
    loader = make_loader(ds, data, False, batch_sampler=sampler, collate_fn=collate)
    it = iter(loader)
    for _ in range(4 * workers + 2):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=get_preset("shapes-base32").resolution)
    ap.add_argument("--batch", type=int, default=TrainConfig(batch_size=256).batch_size)
    ap.add_argument("--batches", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = ShapesDataset(args.size)
    n = 2048
    scenes = [ds.scene(i) for i in range(n)]
    costs = {
        "scene_draw_us": per_sample_us(lambda: [ds.scene(i) for i in range(n)], n),
        "whole_canvas_render_us": per_sample_us(
            lambda: [whole_canvas(s, args.size) for s in scenes], n
        ),
        "item_by_item_us": per_sample_us(lambda: collate([ds[i] for i in range(n)]), n),
        "batched_us": per_sample_us(
            lambda: [
                collate(ds.__getitems__(list(range(b, b + args.batch))))
                for b in range(0, n, args.batch)
            ],
            n,
        ),
    }
    costs["batched_over_item_by_item"] = costs["item_by_item_us"] / costs["batched_us"]
    print(table([costs], list(costs)), flush=True)
    rows = []
    for workers in (1, 2):
        row: dict[str, Any] = {"workers": workers, "batch": args.batch}
        for name, data in (("batched", ds), ("item_by_item", ItemByItem(ds))):
            row[f"{name}_samples_per_s"] = loader_samples_per_s(
                data, workers, args.batch, args.batches
            )
        row["ratio"] = row["batched_samples_per_s"] / row["item_by_item_samples_per_s"]
        rows.append(row)
        print(table(rows[-1:], list(row)), flush=True)
    path = write("input_pipeline-cpu", {"size": args.size, "per_sample": costs, "loader": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
