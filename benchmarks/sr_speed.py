"""Default sampling speed of two cascades in one run (the bundled model against another
model directory, e.g. the previous version's): whole-cascade images/s at each model's stored
defaults, alternating the models over --repeats rounds so load changes hit both alike.

    python benchmarks/sr_speed.py OTHER_MODEL_DIR [--images 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

from imagen.evaluation.shapes import shapes_prompts
from imagen.pipeline import ImagenPipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("other")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    pipes = {
        "bundled": ImagenPipeline.from_pretrained(),
        "other": ImagenPipeline.from_pretrained(a.other),
    }
    prompts = shapes_prompts(a.images, 0)[: a.images]
    for pipe in pipes.values():
        pipe(prompts[:2], seed=0)  # warm-up
    best = {name: float("inf") for name in pipes}
    for _ in range(a.repeats):
        for name, pipe in pipes.items():
            t = time.perf_counter()
            pipe(prompts, seed=0, batch_size=a.images)
            best[name] = min(best[name], time.perf_counter() - t)
    for name, s in best.items():
        print(f"{name}: {a.images / s:.2f} images/s (best of {a.repeats})")
    print(f"speed ratio bundled / other: {best['other'] / best['bundled']:.3f}")


if __name__ == "__main__":
    main()
