"""Evaluation: prompt-following on Shapes (``imagen eval shapes``).

A fixed, seeded set of prompts per group (seen one-object, seen two-object, held-out pairs;
paraphrases of seen captions in seen and in held-out wording) is sampled through the whole
cascade; the Shapes checker scores every stage's images, so a
report shows where in the cascade accuracy is lost: accuracy by the checker's default and strict
shape decisions, background error, and shape fidelity at the stage's own resolution (each
object's mask against a crisp rendering of its shape, relative to crisp renders of the same
captions at that resolution: 1.0 is as crisp as a render).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imagen.data.checker import caption_group, score
from imagen.data.shapes import all_captions, parse_caption
from imagen.data.wording import paraphrase
from imagen.evaluation.fid import FeatureNetwork
from imagen.pipeline import ImagenPipeline, SamplingOverrides, sampling_summary
from imagen.utils.grid import captioned_grid

GROUPS = ("one", "two", "heldout", "paraphrase", "paraphrase_heldout")
GRAMMAR_GROUPS = GROUPS[:3]  # what an evaluation recorded without its groups ran (before v4)


def shapes_prompts(num_per_group: int, seed: int = 0, groups: Sequence[str] = GROUPS) -> list[str]:
    """``num_per_group`` prompts from each of ``groups``: the grammar's (seen one- and
    two-object, held-out pairs; drawn without replacement where possible), then paraphrases
    of seen captions in seen and in held-out wording (see :func:`paraphrase_prompts`). A
    group's prompts are the same whichever other groups are asked for."""
    captions = all_captions()
    rng = np.random.default_rng(seed)
    drawn: dict[str, list[str]] = {}
    for g in GRAMMAR_GROUPS:
        caps = captions[g]
        idx = rng.choice(len(caps), num_per_group, replace=num_per_group > len(caps))
        drawn[g] = [caps[i] for i in idx]
    for g in GROUPS[3:]:
        drawn[g] = paraphrase_prompts(num_per_group, rng, g)
    return [p for g in groups for p in drawn[g]]


def recorded_groups(record: dict[str, Any]) -> tuple[str, ...]:
    """The groups a recorded evaluation (or its check) ran."""
    return tuple(record.get("groups", GRAMMAR_GROUPS))


def paraphrase_prompts(num: int, rng: np.random.Generator, group: str) -> list[str]:
    """``num`` paraphrases (one-object and two-object scenes in turn) of random seen captions,
    each in ``group``: 'paraphrase' (seen wording, never the grammar's own caption) or
    'paraphrase_heldout' (one part in held-out wording)."""
    captions = all_captions()
    prompts = []
    for j in range(num):
        pool = captions["one" if j % 2 == 0 else "two"]
        parsed = parse_caption(pool[int(rng.integers(len(pool)))])
        while caption_group(prompt := paraphrase(parsed, rng, group != "paraphrase")) != group:
            pass  # seen wording that came out as the grammar's caption: draw again
        prompts.append(prompt)
    return prompts


def eval_shapes(
    pipe: ImagenPipeline,
    num_per_group: int = 50,
    overrides: SamplingOverrides | None = None,
    seed: int = 0,
    batch_size: int = 32,
    out_dir: str | Path | None = None,
    groups: Sequence[str] = GROUPS,
) -> dict[str, Any]:
    """Sample the fixed prompt set of ``groups`` (with the stages' settings changed by
    ``overrides``) and score every stage with the Shapes checker."""
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown Shapes groups {unknown}; the groups are {list(GROUPS)}")
    prompts = shapes_prompts(num_per_group, seed, groups)
    out = pipe(
        prompts, seed=seed, batch_size=batch_size, return_all_stages=True, overrides=overrides
    )
    per_stage = {}
    for k, images in enumerate(out.stages):
        res = pipe.cascade.stages[k].config.resolution
        per_stage[f"stage{k}_{res}px"] = score(images, prompts)
    report = summarise(per_stage)
    report.update(
        {
            "settings": sampling_summary(out.sampling),
            "num_per_group": num_per_group,
            "seed": seed,
            "groups": list(groups),
        }
    )
    if out_dir is not None:
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        for j, img in enumerate(out.images):
            img.save(d / f"{j:04d}.png")
        show = [
            j
            for g in range(len(groups))
            for j in range(g * num_per_group, g * num_per_group + min(8, num_per_group))
        ]
        captioned_grid([out.images[j] for j in show], [prompts[j] for j in show], columns=8).save(
            d / "grid.png"
        )
        (d / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def summarise(per_stage: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report of :func:`eval_shapes` from each stage's :func:`~imagen.data.checker.score`:
    the final stage's accuracy (default and strict) and failures, and per stage the accuracies,
    background error and shape fidelity (``shape_fidelity``: relative to crisp renders;
    ``shape_fidelity_detail``: the generated and rendered means, overall and per shape)."""
    final = list(per_stage.values())[-1]
    return {
        "accuracy": final["accuracy"],
        "accuracy_strict": final["accuracy_strict"],
        "count": final["count"],
        "failures": final["failures"],
        "failures_strict": final["failures_strict"],
        "per_stage": {k: v["accuracy"] for k, v in per_stage.items()},
        "per_stage_strict": {k: v["accuracy_strict"] for k, v in per_stage.items()},
        "background_error": {k: v["background_error"] for k, v in per_stage.items()},
        "shape_fidelity": {k: v["shape_fidelity"]["relative"] for k, v in per_stage.items()},
        "shape_fidelity_detail": {
            k: {
                "generated": v["shape_fidelity"]["generated"]["mean"],
                "renders": v["shape_fidelity"]["renders"]["mean"],
                "generated_by_shape": v["shape_fidelity"]["generated"]["by_shape"],
                "renders_by_shape": v["shape_fidelity"]["renders"]["by_shape"],
                "objects": v["shape_fidelity"]["generated"]["objects"],
            }
            for k, v in per_stage.items()
        },
    }


def eval_fid(
    pipe: ImagenPipeline,
    data: str | Path,
    num: int = 500,
    overrides: SamplingOverrides | None = None,
    seed: int = 0,
    batch_size: int = 32,
    feature_network: str | FeatureNetwork = "fid-helper-inception",
    cache_dir: str | Path = ".cache/imagen-fid",
) -> dict[str, Any]:
    """FID / KID of ``num`` generated images (prompted with captions of the real dataset)
    against ``num`` real images centre-cropped to the model's resolution; ``feature_network``
    is a name, a TorchScript path or a loaded network."""
    from imagen.data.folders import ImageTextFolder
    from imagen.evaluation.fid import (
        cached_features,
        clip_score_status,
        features,
        fid_kid,
        to_uint8,
    )

    net = (
        feature_network
        if isinstance(feature_network, FeatureNetwork)
        else FeatureNetwork(feature_network)
    )
    size = pipe.cascade.stages[-1].config.resolution
    ds = ImageTextFolder(data, size)
    idx = np.random.default_rng(seed).choice(len(ds), min(num, len(ds)), replace=False)

    def real_images() -> Any:
        return to_uint8(torch.stack([ds[int(i)][0] for i in idx]))

    key = f"{Path(data).resolve()}|{size}|{seed}|{len(idx)}"
    real = cached_features(net, real_images, key, Path(cache_dir))
    captions = [ds.records[int(i)][1] for i in idx]
    out = pipe(captions, seed=seed, batch_size=batch_size, overrides=overrides)
    fake = features(net, to_uint8(out.images))
    return {
        **fid_kid(real, fake),
        "num_real": len(real),
        "num_generated": len(fake),
        "resolution": size,
        "feature_network": f"{net.name} ({net.path.name})",
        "clip_score": clip_score_status(),
    }


CHECK = {"num_per_group": 2, "seed": 0}  # the small evaluation a model's tests can afford


def record_evaluation(
    model_dir: str | Path, report: dict[str, Any], check: dict[str, Any], command: str
) -> None:
    """Write an evaluation into the model's model_index.json (``evaluation``: the report and
    the command that reproduces it; ``evaluation_check``: a small evaluation at default
    settings that a test reruns exactly). The index is replaced atomically."""
    from imagen.models.model_dir import update_index

    update_index(
        model_dir,
        {
            "evaluation": {"command": command, **report},
            "evaluation_check": {
                **CHECK,
                "groups": check["groups"],
                "accuracy": check["accuracy"],
                "accuracy_strict": check["accuracy_strict"],
            },
        },
    )
