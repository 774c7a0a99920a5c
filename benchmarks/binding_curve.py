"""Where compositional binding appears: Shapes accuracy (one-object, two-object, held-out) of a
base stage's EMA weights at every checkpoint of one or more training runs.

Each checkpoint's base stage is scored alone (32 px images, the stage's own sampling defaults
unless overridden) with the fixed prompt set of ``imagen eval shapes --num N``. Writes
benchmarks/results/binding_curve-DATE.json (or --name) with one curve per run.

    python benchmarks/binding_curve.py runs/base32 [runs/base32-seed1 ...] [--num 40]
        [--final-num 100] [--device cuda] [--every 1]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from common import table, write

from imagen.evaluation.shapes import eval_shapes
from imagen.models.cascade import Cascade
from imagen.models.stage import Stage
from imagen.pipeline import ImagenPipeline
from imagen.text.encoders import TextEncoderConfig, load_text_encoder
from imagen.training.rundir import RunDirectory
from imagen.utils.tensors import load_strict, load_tensors


def score(pipe: ImagenPipeline, num: int, batch: int) -> dict[str, float]:
    report = eval_shapes(pipe, num, batch_size=batch)
    return {g: round(100 * a, 1) for g, a in report["accuracy"].items()}


def run_curve(
    path: str,
    num: int,
    final_num: int,
    every: int,
    device: torch.device,
    batch: int,
    saved: Callable[[dict], None],
) -> dict:
    """The accuracy of the EMA weights of each kept checkpoint of one run (``saved`` is called
    with the partial curve after every checkpoint, so a run cut short keeps what it scored)."""
    rd = RunDirectory(path)
    cfg = rd.stage_config()
    te = rd.text_encoder()
    encoder = load_text_encoder(
        TextEncoderConfig(name=te["name"], max_length=int(te["max_length"])), device
    )
    stage = Stage(cfg).to(device).eval()
    pipe = ImagenPipeline(Cascade(encoder, [stage]))
    ckpts = rd.checkpoints()
    rows: list[dict] = []
    curve = {"run_dir": path, "options": rd.read_options(), "curve": rows, "final": None}
    for k, ckpt in enumerate(ckpts):
        if k % every and k != len(ckpts) - 1:
            continue
        load_strict(stage.unet, load_tensors(ckpt / "ema.safetensors"), str(ckpt))
        state = rd.training_record(ckpt)
        row = {"step": state["steps"], "images_seen": state["samples_seen"]}
        row.update(score(pipe, num, batch))
        rows.append(row)
        print(table([row], list(row)), flush=True)
        saved(curve)
    if final_num:
        curve["final"] = {"num_per_group": final_num, **score(pipe, final_num, batch)}
        print("final", curve["final"], flush=True)
    saved(curve)
    return curve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="training run directories of base stages")
    ap.add_argument("--num", type=int, default=40, help="prompts per group at each checkpoint")
    ap.add_argument("--final-num", type=int, default=0, help="also score the last this widely")
    ap.add_argument("--every", type=int, default=1, help="score every k-th kept checkpoint")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=120)
    ap.add_argument("--name", default="binding_curve")
    args = ap.parse_args()
    started = time.time()
    device = torch.device(args.device)
    curves: list[dict] = []

    def saved(curve: dict) -> None:
        done = [c for c in curves if c["run_dir"] != curve["run_dir"]] + [curve]
        write(args.name, {"num_per_group": args.num, "runs": done})

    for r in args.runs:
        curves.append(
            run_curve(r, args.num, args.final_num, args.every, device, args.batch_size, saved)
        )
    print(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
