"""`imagen tune` at its defaults on the bundled Shapes cascade: four images of a purple
circle in the centre, the new token "zwx circle", prior preservation with the model's own
images of "a circle". Measures, on seeds the tuning never saw (Shapes checker):

- how often the base stage and the whole cascade (128 px) draw one purple circle for
  "a zwx circle", before and after (the subject learned),
- how often "a circle" gives a purple circle before and after, and how many colours its
  circles take (prior preservation: the class keeps its variety),
- the wall time of each phase and the peak memory of the process.

    python benchmarks/tune_shapes.py [--threads 2] [--steps N] [--lr LR] [--num 32]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import peak_rss_mb, write  # noqa: E402

from imagen.data.checker import detect_objects  # noqa: E402
from imagen.data.shapes import render_scene, scene_for_caption  # noqa: E402
from imagen.models.cascade import Cascade, load_cascade  # noqa: E402
from imagen.models.lora import apply_loras  # noqa: E402
from imagen.pipeline import resolve_model  # noqa: E402
from imagen.training.tune import TuneOptions, tune  # noqa: E402
from imagen.utils.pil import tensor_to_pil  # noqa: E402

SUBJECT = "a purple circle in the center"


def evaluate(lora: Path | None, prompt: str, seeds: list[int], stages: int) -> dict:
    """Share of one-purple-circle images, and the colours of single circles, for ``prompt``."""
    full = load_cascade(resolve_model(None))
    if lora is not None:
        apply_loras(full, [str(lora)])
    cascade = Cascade(full.text_encoder, list(full.stages)[:stages])
    colours: Counter[str] = Counter()
    hits = 0
    for start in range(0, len(seeds), 16):
        batch = seeds[start : start + 16]
        for image in cascade.sample([prompt] * len(batch), seeds=batch)[-1]:
            objs = detect_objects(tensor_to_pil(image))
            one = len(objs) == 1 and objs[0].shape == "circle"
            hits += one and objs[0].color == "purple"
            colours[objs[0].color if one else "other"] += 1
    return {"subject_share": hits / len(seeds), "colours": dict(colours)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, help="training steps (default: tune's for the stage)")
    p.add_argument("--lr", type=float, help="learning rate (default: tune's for the stage)")
    p.add_argument("--num", type=int, default=32, help="evaluation seeds")
    p.add_argument("--name", default="tune_shapes-cpu", help="result file name")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="tune-shapes-"))
    try:
        images = work / "subject"
        images.mkdir()
        rng = np.random.default_rng(0)
        for i in range(4):
            render_scene(scene_for_caption(SUBJECT, rng), 32).save(images / f"{i}.png")
        options = TuneOptions(
            images, "zwx circle", resolve_model(None), work / "run", class_prompt="a circle"
        )
        options.steps, options.lr = args.steps, args.lr
        started = time.time()
        record = tune(options, progress=False)
        wall = time.time() - started
        lora = Path(record["lora"])
        seeds = list(range(1000, 1000 + args.num))
        results = {}
        for name, stages in (("base_stage", 1), ("cascade_128px", 3)):
            for prompt in ("a zwx circle", "a circle"):
                for tuned in (False, True):
                    key = f"{name} | {prompt} | {'tuned' if tuned else 'before'}"
                    results[key] = evaluate(lora if tuned else None, prompt, seeds, stages)
                    print(f"{key}: {results[key]}")
        shutil.copy(record["grid"], Path(__file__).parent / "results" / f"{args.name}-grid.png")
        payload = {
            "subject": SUBJECT,
            "token": "zwx circle",
            "class_prompt": "a circle",
            "tune": {k: record[k] for k in ("settings", "data", "steps", "seconds", "threads")},
            "tune_wall_s": round(wall, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "eval_seeds": args.num,
            "results": results,
        }
        print(f"tune: {wall:.0f} s, peak RSS {peak_rss_mb():.0f} MB")
        print(f"wrote {write(args.name, payload)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
