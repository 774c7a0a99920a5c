"""Speed against accuracy of sampling settings for a cascade (the bundled one by default), all
in one run on one machine: for each setting, images/s of the whole cascade (one pipeline
call over --images prompts), Shapes accuracy and background error (`imagen eval shapes
--num N`, same seeds). The first row, v1's defaults (float32, 20 DPM-Solver++ steps and
guidance 3 at every stage), is the baseline of the speed-up column. Writes
benchmarks/results/fast_sampling-DATE.json.

    python benchmarks/fast_sampling.py [--model DIR] [--num 100] [--images 16] [--only NAME ...]
    python benchmarks/fast_sampling.py --only v1 "the model" --also DISTILLED_DIR ... \
        --name fast_sampling_distilled   (distilled cascades against the same baseline)
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from common import table, write

from imagen.evaluation.shapes import eval_shapes, shapes_prompts
from imagen.pipeline import ImagenPipeline, SamplingOverrides, sampling_summary

# name -> overrides of the model's stored defaults (an empty dict: the stored defaults)
SETTINGS: dict[str, dict[str, Any]] = {
    "v1 defaults (fp32, 20 steps, guidance 3 everywhere)": {
        "precision": "fp32",
        "steps": 20,
        "guidance": 3.0,
        "threshold": 0.995,  # dynamic thresholding, as v1 stored it
    },
    "bf16, 20 steps, guidance 3 everywhere": {"precision": "bf16", "steps": 20, "guidance": 3.0},
    "bf16, steps 10/8/8, guidance 3/1/1": {
        "precision": "bf16",
        "steps": [10, 8, 8],
        "guidance": [3.0, 1.0, 1.0],
    },
    "bf16, steps 8/6/4, guidance 3/1/1": {
        "precision": "bf16",
        "steps": [8, 6, 4],
        "guidance": [3.0, 1.0, 1.0],
    },
    "the model's stored defaults": {},
}


def images_per_s(pipe: ImagenPipeline, overrides: SamplingOverrides, n: int, batch: int) -> float:
    """Whole-cascade images/s for ``n`` prompts in one call (best of two, after a warm-up)."""
    prompts = shapes_prompts(n)[:n]
    pipe(prompts[:batch], batch_size=batch, overrides=overrides)  # warm-up
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        pipe(prompts, batch_size=batch, overrides=overrides)
        best = min(best, time.perf_counter() - t0)
    return n / best


def measure(
    pipe: ImagenPipeline, name: str, overrides: SamplingOverrides, args: argparse.Namespace
) -> dict[str, Any]:
    """One row: whole-cascade images/s, Shapes accuracy and background error (levels, per
    stage) of ``pipe`` with ``overrides``."""
    speed = images_per_s(pipe, overrides, args.images, args.batch_size)
    report = eval_shapes(pipe, args.num, overrides, batch_size=32)
    return {
        "setting": name,
        "images_per_s": speed,
        **{g: round(100 * a, 1) for g, a in report["accuracy"].items()},
        "per_stage": report["per_stage"],
        "background_error": report["background_error"],
        "sampling": sampling_summary(pipe.sampling_configs(overrides)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="model directory (default: the bundled cascade)")
    ap.add_argument("--num", type=int, default=100, help="prompts per group for the accuracy")
    ap.add_argument("--images", type=int, default=16, help="prompts for the speed measurement")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--only", nargs="*", help="run only the settings whose names start so")
    ap.add_argument("--also", nargs="*", default=[], help="more model directories, each a row")
    ap.add_argument("--name", default="fast_sampling")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = ImagenPipeline.from_pretrained(args.model)
    runs = [(name, pipe, changes) for name, changes in SETTINGS.items()]
    runs = [r for r in runs if not args.only or any(r[0].startswith(o) for o in args.only)]
    runs += [
        (f"{d}: its stored defaults", ImagenPipeline.from_pretrained(d), {}) for d in args.also
    ]
    rows: list[dict[str, Any]] = []
    for name, model, changes in runs:
        rows.append(measure(model, name, SamplingOverrides(**changes), args))
        rows[-1]["speedup"] = rows[-1]["images_per_s"] / rows[0]["images_per_s"]
        print(table(rows[-1:], ["setting", "images_per_s", "speedup", "one", "two", "heldout"]))
        model_name = args.model or "bundled"
        write(args.name, {"model": model_name, "num_per_group": args.num, "rows": rows})
    print()
    print(table(rows, ["setting", "images_per_s", "speedup", "one", "two", "heldout"]))


if __name__ == "__main__":
    main()
