"""Prompt-following by CLIP score over a prompt suite (``imagen eval clip``).

Images come from sampling each prompt (image j of the run, prompt-major, with seed
``seed + j``: the images ``imagen sample`` makes from the same prompts, seed and settings) or
from a folder ``imagen sample`` wrote (its manifest.jsonl names each image's prompt and seed).
They are scored one batch at a time and let go of, so memory does not grow with the suite; the
report is the mean CLIP score overall and per category with 95% bootstrap intervals over
prompts (:mod:`imagen.evaluation.bootstrap`), and a contact sheet per category shows its best
and worst images, read back from where they were written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from imagen.evaluation.bootstrap import bootstrap_mean
from imagen.evaluation.clip import ClipScorer
from imagen.evaluation.suites import UNCATEGORISED, SuitePrompt
from imagen.pipeline import ImagenPipeline, PipelineOutput, ProgressCallback, SamplingOverrides
from imagen.pipeline.outputs import RunWriter
from imagen.utils.grid import captioned_grid
from imagen.utils.outputs import StagedOutput

Checker = Callable[[Image.Image, str], bool]  # a ground-truth verdict (the Shapes checker)
Writer = Callable[[PipelineOutput], Sequence[str | None]]  # writes a batch, returns its paths


@dataclass
class ScoredImage:
    """One image's row of scores.jsonl."""

    prompt: str
    category: str
    clip_score: float
    path: str | None = None  # relative to the output directory, or as the manifest had it
    seed: int | None = None
    challenge: str | None = None
    checker: bool | None = None  # the Shapes checker's verdict, for the shapes suite

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class ClipScores:
    """Scores images batch by batch and keeps one :class:`ScoredImage` per image."""

    def __init__(self, scorer: ClipScorer, checker: Checker | None = None) -> None:
        self.scorer, self.checker = scorer, checker
        self.records: list[ScoredImage] = []

    def add(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[SuitePrompt],
        seeds: Sequence[int | None],
        paths: Sequence[str | None],
    ) -> list[ScoredImage]:
        """Score one batch (the images are not kept)."""
        scores = self.scorer.scores(images, [p.text for p in prompts])
        rows = [
            ScoredImage(
                p.text,
                p.category,
                round(s, 4),
                path,
                seed,
                p.challenge,
                self.checker(img, p.text) if self.checker else None,
            )
            for img, p, s, seed, path in zip(images, prompts, scores, seeds, paths, strict=True)
        ]
        self.records += rows
        return rows


def summary(records: Sequence[ScoredImage], seed: int = 0) -> dict[str, Any]:
    """Mean CLIP score with its 95% interval (prompts resampled), overall, per category and
    (where prompts have one) per challenge; with checker verdicts also the checker's accuracy and the mean score of the images it
    passes and fails."""
    if not records:
        raise ValueError("no images were scored")
    out = _block(records, seed)
    out["per_category"] = {
        c: _block([r for r in records if r.category == c], seed)
        for c in dict.fromkeys(r.category for r in records)
    }
    if any(r.challenge for r in records):  # PartiPrompts' second axis
        out["per_challenge"] = {
            c: _block([r for r in records if r.challenge == c], seed)
            for c in dict.fromkeys(r.challenge for r in records if r.challenge)
        }
    if records[0].checker is not None:
        out["clip_score_by_checker"] = {
            verdict: _block([r for r in records if r.checker is passed], seed, checker=False)
            for verdict, passed in (("passed", True), ("failed", False))
            if any(r.checker is passed for r in records)
        }
    return out


def _block(records: Sequence[ScoredImage], seed: int, checker: bool = True) -> dict[str, Any]:
    interval = bootstrap_mean(
        [r.clip_score for r in records], [r.prompt for r in records], seed=seed
    )
    block = {
        "clip_score": interval.to_dict(),
        "images": interval.count,
        "prompts": interval.clusters,
    }
    if checker and records[0].checker is not None:
        block["checker_accuracy"] = round(sum(bool(r.checker) for r in records) / len(records), 4)
    return block


def prompt_batches(
    prompts: Sequence[SuitePrompt], num_images: int, seed: int, batch_size: int
) -> Iterator[tuple[list[SuitePrompt], list[int]]]:
    """(prompts, seeds) of each batch: ``num_images`` of each prompt, image j (prompt-major)
    with seed ``seed + j``, as ``imagen sample`` numbers them."""
    batch: tuple[list[SuitePrompt], list[int]] = ([], [])
    for j in range(len(prompts) * num_images):
        batch[0].append(prompts[j // num_images])
        batch[1].append(seed + j)
        if len(batch[0]) == batch_size:
            yield batch
            batch = ([], [])
    if batch[0]:
        yield batch


def sample_and_score(
    pipe: ImagenPipeline,
    prompts: Sequence[SuitePrompt],
    overrides: SamplingOverrides | None,
    scores: ClipScores,
    num_images: int = 1,
    seed: int = 0,
    batch_size: int = 16,
    write: Writer | None = None,
    progress: ProgressCallback | None = None,
    done: Callable[[int], object] | None = None,
) -> list[ScoredImage]:
    """Sample ``num_images`` of each prompt with the stages' settings changed by
    ``overrides``, ``batch_size`` at a time; each
    batch is handed to ``write`` (which returns the paths it wrote) and scored, then let go
    of. ``done`` gets the number of images of each finished batch."""
    for batch, seeds in prompt_batches(prompts, num_images, seed, batch_size):
        texts = [p.text for p in batch]
        out = pipe.generate(texts, seeds, overrides, batch_size=batch_size, progress=progress)
        paths = write(out) if write else [None] * len(seeds)
        scores.add(out.images, batch, seeds, paths)
        if done:
            done(len(seeds))
    return scores.records


def batch_writer(writer: RunWriter, prefix: str = "") -> Writer:
    """A :data:`Writer` over ``imagen sample``'s RunWriter: it writes a batch's PNGs and
    manifest rows and returns the PNGs' paths (the writer's numbering) with ``prefix``."""

    def write(out: PipelineOutput) -> list[str | None]:
        first = writer.count
        writer.add(out)
        return [f"{prefix}{j:04d}.png" for j in range(first, writer.count)]

    return write


class Subdirectory:
    """A subdirectory of a staged output, for a RunWriter to write into (``imagen eval
    compare``'s a/ and b/, each a sample folder of its own)."""

    def __init__(self, staged: StagedOutput, name: str) -> None:
        self.dir = staged.path(name)
        self.dir.mkdir()

    def path(self, name: str) -> Path:
        return self.dir / name


def read_manifest(folder: str | Path) -> list[dict[str, Any]]:
    """The rows of ``folder/manifest.jsonl`` (as ``imagen sample`` writes it), each with a
    prompt and an image path that exists; a ValueError for anything else."""
    path = Path(folder) / "manifest.jsonl"
    if not path.is_file():
        raise ValueError(f"--images {folder}: no manifest.jsonl (write one with imagen sample)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n} is not JSON ({e.msg})") from None
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)):
            raise ValueError(f"{path}: line {n} has no prompt")
        if not isinstance(row.get("path"), str) or not (Path(folder) / row["path"]).is_file():
            raise ValueError(f"{path}: line {n}: image {row.get('path')!r} not found")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no images listed")
    return rows


def score_folder(
    folder: str | Path,
    rows: Sequence[dict[str, Any]],
    scores: ClipScores,
    suite: Sequence[SuitePrompt] = (),
    batch_size: int = 32,
    done: Callable[[int], object] | None = None,
) -> list[ScoredImage]:
    """Score every image of a folder's manifest ``rows`` (:func:`read_manifest`),
    ``batch_size`` at a time; a row's category is its own ``category``, else its prompt's in
    ``suite``, else uncategorised."""
    from imagen.data.images import decode_user_image

    known = {p.text: p for p in suite}
    for b in range(0, len(rows), batch_size):
        chunk = rows[b : b + batch_size]
        paths = [str(Path(folder) / r["path"]) for r in chunk]
        images = [decode_user_image(Path(p), f"image {p}") for p in paths]
        prompts = [
            SuitePrompt(r["prompt"], str(r["category"]))
            if r.get("category")
            else known.get(r["prompt"], SuitePrompt(r["prompt"], UNCATEGORISED))
            for r in chunk
        ]
        scores.add(images, prompts, [r.get("seed") for r in chunk], paths)
        if done:
            done(len(chunk))
    return scores.records


def contact_sheet(
    records: Sequence[ScoredImage], root: str | Path = ".", per_row: int = 4, tile: int = 128
) -> Image.Image | None:
    """The best ``per_row`` images (first row) and worst ``per_row`` (second row) of
    ``records`` by CLIP score, each captioned with its score and prompt; images are read from
    ``root / path``. None when no record has a path."""
    from imagen.data.images import decode_user_image

    ranked = sorted((r for r in records if r.path), key=lambda r: -r.clip_score)
    if not ranked:
        return None
    n = len(ranked)
    ranks = list(range(n)) if n <= 2 * per_row else [*range(per_row), *range(n - per_row, n)]
    picked = [ranked[i] for i in ranks]
    images = [decode_user_image(Path(root) / str(r.path), f"image {r.path}") for r in picked]
    captions = [
        f"#{i + 1} {r.clip_score:.1f}: {r.prompt}" for i, r in zip(ranks, picked, strict=True)
    ]
    return captioned_grid(images, captions, columns=min(per_row, len(picked)), tile=tile)


def sheet_name(category: str, taken: set[str]) -> str:
    """A file name for a category's contact sheet, unique among ``taken`` (which it joins)."""
    slug = re.sub(r"[^a-z0-9]+", "-", category.lower()).strip("-")[:60] or "category"
    name, n = f"sheet-{slug}.png", 2
    while name in taken:
        name, n = f"sheet-{slug}-{n}.png", n + 1
    taken.add(name)
    return name


def write_report(
    directory: Path,
    report: dict[str, Any],
    records: Sequence[ScoredImage],
    root: Path,
    per_row: int = 4,
) -> list[str]:
    """report.json, scores.jsonl and a contact sheet per category in ``directory`` (images
    read from ``root``); returns the sheets' file names, also recorded in the report."""
    with open(directory / "scores.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json()) + "\n")
    taken: set[str] = set()
    sheets = {}
    for category in dict.fromkeys(r.category for r in records):
        sheet = contact_sheet([r for r in records if r.category == category], root, per_row)
        if sheet is not None:
            sheets[category] = sheet_name(category, taken)
            sheet.save(directory / sheets[category])
    report["sheets"] = sheets
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return list(sheets.values())
