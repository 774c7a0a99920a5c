"""What a sampling run writes: numbered PNGs, ``manifest.jsonl`` (one row per image, with its
prompt, seed and settings) and a captioned ``grid.png``, into a
:class:`~imagen.utils.outputs.StagedOutput` (written aside, moved into place at the end).
``imagen sample`` and ``imagen upscale`` write through :class:`RunWriter`; the evaluations
and benchmarks use the same files."""

from __future__ import annotations

import json
from typing import Any

from PIL import Image

from imagen.models.sampling import sampling_summary
from imagen.pipeline.pipeline import PipelineOutput
from imagen.utils.outputs import StagedOutput

RUN_FILES = r"\d{4,}(_stage\d+)?\.png|grid\.png|manifest\.jsonl"  # what a run writes
GRID_IMAGES = 64  # grid.png shows the first 64 images (a grid of a million would not fit)


class RunWriter:
    """Writes a run's PNGs and manifest.jsonl (one row per image, with its settings) batch
    by batch as they finish, keeping only the first :data:`GRID_IMAGES` for grid.png."""

    def __init__(self, staged: StagedOutput, model: str, save_stages: bool = False) -> None:
        self.staged, self.model, self.save_stages = staged, model, save_stages
        self.manifest = open(staged.path("manifest.jsonl"), "w", encoding="utf-8")  # noqa: SIM115
        self.count = 0
        self.grid: list[tuple[Image.Image, str]] = []

    def add(self, out: PipelineOutput, sources: list[str] | None = None) -> None:
        """Write the images of one finished batch (``sources``: the input file of each)."""
        settings = sampling_summary(out.sampling)
        for i, (img, prompt, seed) in enumerate(
            zip(out.images, out.prompts, out.seeds, strict=True)
        ):
            name = f"{self.count:04d}.png"
            img.save(self.staged.path(name))
            rec: dict[str, Any] = {
                "prompt": prompt,
                "seed": seed,
                "path": name,
                "size": list(img.size),
                "model": self.model,
                "stages": settings,
            }
            if out.negative_prompts:
                rec["negative_prompt"] = out.negative_prompts[i]
            if sources is not None:
                rec["source"] = sources[i]
            if self.save_stages:
                rec["stage_paths"] = []
                for k, imgs in enumerate(out.stages[:-1]):
                    sname = f"{self.count:04d}_stage{k}.png"
                    imgs[i].save(self.staged.path(sname))
                    rec["stage_paths"].append(sname)
            self.manifest.write(json.dumps(rec) + "\n")
            if len(self.grid) < GRID_IMAGES:
                self.grid.append((img, f"{prompt} (seed {seed})"))
            self.count += 1

    def close(self) -> None:
        """Finish the manifest."""
        self.manifest.close()

    def write_grid(self) -> None:
        """Write grid.png of the first images (after a run that succeeded)."""
        if self.grid:
            save_grid(self.staged, self.grid)


def write_outputs(
    staged: StagedOutput,
    out: PipelineOutput,
    model: str,
    save_stages: bool = False,
    sources: list[str] | None = None,
) -> None:
    """The PNGs and manifest.jsonl of a finished run held in memory (as the commands write
    them batch by batch; for callers with one :class:`PipelineOutput`)."""
    writer = RunWriter(staged, model, save_stages)
    try:
        writer.add(out, sources)
    finally:
        writer.close()


def write_grid(staged: StagedOutput, out: PipelineOutput) -> None:
    """grid.png of a run held in memory: its first :data:`GRID_IMAGES` images, captioned."""
    n = min(GRID_IMAGES, len(out.images))
    save_grid(
        staged, [(out.images[j], f"{out.prompts[j]} (seed {out.seeds[j]})") for j in range(n)]
    )


def save_grid(staged: StagedOutput, items: list[tuple[Image.Image, str]]) -> None:
    """grid.png of (image, caption) pairs, six columns at most."""
    from imagen.utils.grid import captioned_grid

    images, captions = zip(*items, strict=True)
    captioned_grid(list(images), list(captions), columns=min(6, len(images))).save(
        staged.path("grid.png")
    )
