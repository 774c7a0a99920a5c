"""Quality against cost: Shapes accuracy of a model against the number of sampling steps of the
base stage, for each sampler, so the fastest sampler that loses no accuracy is known. By default
the base stage's images are scored: prompt following is decided there (`imagen eval shapes`
reports the same accuracy after every stage); --whole-cascade scores the final images, with the
super-resolution stages at their defaults.

    python benchmarks/quality_vs_steps.py [--model DIR] [--num 20] [--steps 10 20 50 250]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import table, write

from imagen.evaluation.shapes import eval_shapes
from imagen.models.cascade import Cascade
from imagen.pipeline import ImagenPipeline, SamplingOverrides


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--num", type=int, default=20, help="prompts per group")
    ap.add_argument("--steps", nargs="*", type=int, default=[10, 20, 50, 250])
    ap.add_argument("--samplers", nargs="*", default=["ddpm", "ddim", "dpmpp"])
    ap.add_argument("--threads", type=int)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--whole-cascade",
        action="store_true",
        help="score the final images (default: the base stage's, where prompt following is decided)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = ImagenPipeline.from_pretrained(args.model, args.device)
    if not args.whole_cascade:  # super-resolution stages keep the base's accuracy (eval per_stage)
        pipe = ImagenPipeline(Cascade(pipe.cascade.text_encoder, list(pipe.cascade.stages)[:1]))
    defaults = [s.config.sampling.steps for s in pipe.cascade.stages]
    rows = []
    for sampler in args.samplers:
        for steps in args.steps:
            t0 = time.perf_counter()
            per_stage_steps = [steps, *defaults[1:]]
            per_stage_sampler = [sampler] + [
                s.config.sampling.sampler for s in pipe.cascade.stages[1:]
            ]
            overrides = SamplingOverrides(steps=per_stage_steps, sampler=per_stage_sampler)
            report = eval_shapes(pipe, args.num, overrides)
            acc = report["accuracy"]
            rows.append(
                {
                    "sampler": sampler,
                    "base_steps": steps,
                    "one": acc["one"],
                    "two": acc["two"],
                    "heldout": acc["heldout"],
                    "all": acc["all"],
                    "seconds": time.perf_counter() - t0,
                    "base_stage_accuracy": list(report["per_stage"].values())[0]["all"],
                }
            )
            print(table(rows[-1:], list(rows[-1])), flush=True)
    print()
    print(table(rows, list(rows[0])))
    path = write(
        "quality_vs_steps",
        {
            "model": args.model or "bundled",
            "num_per_group": args.num,
            "rows": rows,
            "scored": "final images" if args.whole_cascade else "base-stage images",
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
