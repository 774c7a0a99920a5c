"""A paired comparison of two sampling settings of one model (``imagen eval compare``).

Both arms sample the same prompts with the same seeds (image j: seed ``seed + j``), batch by
batch, in the order a, b then b, a (so warm-up and drift fall on both arms alike). Each image
is CLIP-scored; the report gives each arm's mean CLIP score, the paired difference b - a (the
mean of per-image differences, with a bootstrap interval over prompts, overall and per
category), KID and FID between the two image sets (:mod:`imagen.evaluation.fid`; FID only from
:data:`MIN_FID_IMAGES` images per arm), and each arm's sampling wall time and network
evaluations per image (rows through each stage's network: a guided step counts two, the
conditional and unconditional halves of its one batched pass).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor

from imagen.evaluation.bootstrap import bootstrap_mean
from imagen.evaluation.fid import FeatureNetwork, fid_kid, to_uint8
from imagen.evaluation.prompt_following import ClipScores, ScoredImage, prompt_batches, summary
from imagen.evaluation.suites import SuitePrompt
from imagen.models.cascade import Cascade
from imagen.models.sampling import SamplingConfig
from imagen.pipeline import (
    ImagenPipeline,
    PipelineOutput,
    ProgressCallback,
    SamplingOverrides,
    sampling_summary,
)
from imagen.utils.grid import captioned_grid

MIN_FID_IMAGES = 2048  # the Inception's feature dimension: below it FID's covariance is singular
ArmWriter = Callable[[str, PipelineOutput], Sequence[str | None]]


@dataclass
class Arm:
    """One sampling setting under comparison, and what it measured."""

    name: str  # "a" or "b"
    settings: str  # as given on the command line
    overrides: SamplingOverrides  # what it changes in each stage's defaults
    configs: list[SamplingConfig]  # what each stage runs with (the overrides applied)
    scores: ClipScores
    seconds: float = 0.0  # sampling wall time
    rows: list[int] = field(default_factory=list)  # network rows per stage
    features: list[Tensor] = field(default_factory=list)  # feature-network outputs


@contextmanager
def count_network_rows(cascade: Cascade) -> Iterator[list[int]]:
    """While inside, the number of rows (images; a guided pass counts its two halves) each
    stage's network evaluates, counted by forward pre-hooks."""
    counts = [0] * len(cascade.stages)

    def counter(k: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            counts[k] += int(args[0].shape[0])

        return hook

    hooks = [st.unet.register_forward_pre_hook(counter(k)) for k, st in enumerate(cascade.stages)]
    try:
        yield counts
    finally:
        for h in hooks:
            h.remove()


def run_arms(
    pipe: ImagenPipeline,
    prompts: Sequence[SuitePrompt],
    arms: Sequence[Arm],
    num_images: int = 1,
    seed: int = 0,
    batch_size: int = 16,
    network: FeatureNetwork | None = None,
    write: ArmWriter | None = None,
    progress: ProgressCallback | None = None,
    done: Callable[[int], object] | None = None,
) -> None:
    """Sample and score every batch under each arm (a, b; then b, a; ...); the arms collect
    their scores, times, network rows and (with ``network``) image features."""
    for i, (batch, seeds) in enumerate(prompt_batches(prompts, num_images, seed, batch_size)):
        for arm in arms if i % 2 == 0 else list(reversed(arms)):
            with count_network_rows(pipe.cascade) as rows:
                start = time.perf_counter()
                out = pipe.generate(
                    [p.text for p in batch],
                    seeds,
                    arm.overrides,
                    batch_size=batch_size,
                    progress=progress,
                )
                arm.seconds += time.perf_counter() - start  # the images are on the CPU: synced
            arm.rows = [a + b for a, b in zip(arm.rows or [0] * len(rows), rows, strict=True)]
            paths = write(arm.name, out) if write else [None] * len(seeds)
            arm.scores.add(out.images, batch, seeds, paths)
            if network is not None:
                arm.features.append(_features(network, out.images))
            if done:
                done(len(seeds))


def _features(network: FeatureNetwork, images: list[Image.Image]) -> Tensor:
    """The feature network's (N, D) features of PIL images, on the network's device."""
    weight = next(iter(network.parameters()), None)
    batch = to_uint8(images)
    return network(batch if weight is None else batch.to(weight.device)).cpu()


def arm_report(arm: Arm) -> dict[str, Any]:
    """One arm's part of the report: settings, CLIP scores, time and network evaluations."""
    n = len(arm.scores.records)
    return {
        "settings": arm.settings,
        "sampling": sampling_summary(arm.configs),
        **summary(arm.scores.records),
        "seconds_per_image": round(arm.seconds / n, 4),
        "network_evaluations_per_image": round(sum(arm.rows) / n, 3),
        "network_evaluations_per_image_per_stage": [round(r / n, 3) for r in arm.rows],
    }


def paired_difference(a: Sequence[ScoredImage], b: Sequence[ScoredImage]) -> dict[str, Any]:
    """Mean of the per-image CLIP-score differences b - a, with 95% intervals over prompts,
    overall and per category (the two lists pair image for image)."""
    if [(r.prompt, r.seed) for r in a] != [(r.prompt, r.seed) for r in b]:
        raise ValueError("the arms' images do not pair up (prompts or seeds differ)")
    diffs = [y.clip_score - x.clip_score for x, y in zip(a, b, strict=True)]

    def block(idx: list[int]) -> dict[str, Any]:
        interval = bootstrap_mean([diffs[i] for i in idx], [a[i].prompt for i in idx])
        return {
            "clip_score": interval.to_dict(),
            "b_better": sum(diffs[i] > 0 for i in idx),
            "a_better": sum(diffs[i] < 0 for i in idx),
            "images": interval.count,
            "prompts": interval.clusters,
        }

    out = block(list(range(len(diffs))))
    cats = dict.fromkeys(r.category for r in a)
    out["per_category"] = {c: block([i for i, r in enumerate(a) if r.category == c]) for c in cats}
    return out


def distance(a: Arm, b: Arm, network: FeatureNetwork | None, missing: str | None) -> dict:
    """KID (and, from :data:`MIN_FID_IMAGES` images per arm, FID) between the arms' images;
    a stated reason instead when the feature network is missing or there are too few."""
    if network is None:
        return {"skipped": missing or "no feature network"}
    n = sum(len(f) for f in a.features)
    if n < 2:
        return {"skipped": f"{n} image per arm: KID and FID need at least 2"}
    with_fid = n >= MIN_FID_IMAGES
    scores = fid_kid(_cat(a.features), _cat(b.features), with_fid=with_fid)
    out: dict[str, Any] = {"images_per_arm": n, "feature_network": network.name}
    out["kid"] = round(scores["kid"], 6)
    if n > 1000:  # KID's subsets are all of both sets below that: no spread to report
        out["kid_std"] = round(scores["kid_std"], 6)
    if with_fid:
        out["fid"] = round(scores["fid"], 4)
    else:
        out["fid_skipped"] = (
            f"{n} images per arm; FID needs at least {MIN_FID_IMAGES} (the feature dimension: "
            "below it the covariance is singular and FID's bias swamps differences); KID is "
            "unbiased at any size"
        )
    return out


def _cat(features: list[Tensor]) -> Tensor:
    import torch

    return torch.cat(features)


def side_by_side(
    a: Sequence[ScoredImage],
    b: Sequence[ScoredImage],
    root: Path,
    per_side: int = 4,
    tile: int = 160,
) -> Image.Image | None:
    """Pairs of images (a left, b right) with the largest CLIP-score differences both ways
    (b's largest losses first, then its largest gains), captioned; None without paths."""
    from imagen.data.images import decode_user_image

    order = sorted(
        (i for i in range(len(a)) if a[i].path and b[i].path),
        key=lambda i: b[i].clip_score - a[i].clip_score,
    )
    if not order:
        return None
    picked = order if len(order) <= 2 * per_side else order[:per_side] + order[-per_side:]
    images, captions = [], []
    for i in picked:
        for name, recs in (("a", a), ("b", b)):
            r = recs[i]
            images.append(decode_user_image(root / str(r.path), f"image {r.path}"))
            captions.append(f"{name} {r.clip_score:.1f} (seed {r.seed}): {r.prompt}")
    return captioned_grid(images, captions, columns=2, tile=tile)


def pair_rows(a: Sequence[ScoredImage], b: Sequence[ScoredImage]) -> Iterator[dict[str, Any]]:
    """pairs.jsonl: each prompt and seed with both arms' images and scores."""
    for x, y in zip(a, b, strict=True):
        row = {"prompt": x.prompt, "category": x.category, "seed": x.seed}
        row.update({"a_path": x.path, "b_path": y.path})
        row.update({"a_clip_score": x.clip_score, "b_clip_score": y.clip_score})
        row["difference"] = round(y.clip_score - x.clip_score, 4)
        yield row


def compare_report(
    arms: Sequence[Arm], network: FeatureNetwork | None, missing: str | None = None
) -> dict[str, Any]:
    """The report of :func:`run_arms`: each arm, the paired difference b - a, KID/FID."""
    a, b = arms
    return {
        "images_per_arm": len(a.scores.records),
        "prompts_count": len({r.prompt for r in a.scores.records}),
        "seeds": _seed_range([r.seed for r in a.scores.records]),
        "arms": {arm.name: arm_report(arm) for arm in arms},
        "difference_b_minus_a": paired_difference(a.scores.records, b.scores.records),
        "kid_fid": distance(a, b, network, missing),
    }


def _seed_range(seeds: list[int | None]) -> dict[str, Any]:
    known = [s for s in seeds if s is not None]
    return {
        "first": min(known, default=None),
        "last": max(known, default=None),
        "count": len(seeds),
    }


def write_compare(directory: Path, report: dict[str, Any], arms: Sequence[Arm]) -> None:
    """pairs.jsonl, sheet.png (images read from ``directory``) and report.json."""
    import json

    a, b = (arm.scores.records for arm in arms)
    with open(directory / "pairs.jsonl", "w", encoding="utf-8") as f:
        for row in pair_rows(a, b):
            f.write(json.dumps(row) + "\n")
    sheet = side_by_side(a, b, directory)
    if sheet is not None:
        sheet.save(directory / "sheet.png")
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
