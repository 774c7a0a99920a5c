"""Start a training run from a stored stage's weights: writes a step-0 checkpoint into a new
run directory, so that ``imagen train CONFIG --stage K --out RUN --resume`` fine-tunes that
stage with CONFIG's recipe (its warm-up, schedule and EMA, from step 0) instead of starting
from random weights. This is how the bundled cascade's v3 super-resolution stages were
started (from v1's and v2.1's stages). A training config's ``init: MODEL_DIR:K`` now does the
same from a model directory (v3.1's stages were trained so; ``configs/shapes-sr-v31.yaml``).

    python benchmarks/warm_start.py configs/shapes.yaml --stage 1 \
        --from src/imagen/weights/shapes-cascade/stage1 --out runs/sr64-v3
    imagen train configs/shapes.yaml --stage 1 --out runs/sr64-v3 --threads 1 --resume

The model and EMA weights are the stored stage's (int8 stages are dequantised); the
optimiser state is AdamW's initial one. The stage's U-Net must match the config's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from imagen.models.model_dir import load_stage
from imagen.models.stage import Stage
from imagen.training.checkpoint import save_checkpoint
from imagen.training.config import load_cascade_config
from imagen.training.optim import make_optimizer


def warm_start(config: str, stage_index: int, source: str, out: str) -> Path:
    """The step-0 checkpoint of run directory ``out`` holding ``source``'s weights."""
    run = load_cascade_config(config).stages[stage_index]
    stored = load_stage(source)
    if stored.config.unet != run.stage.unet:
        raise ValueError(f"{source}: its U-Net differs from stage {stage_index} of {config}")
    if (Path(out) / "checkpoints").exists():
        raise FileExistsError(f"{out} already holds checkpoints")
    stage = Stage(run.stage)
    stage.unet.load_state_dict(stored.unet.state_dict())
    weights = {k: v.detach().clone().contiguous() for k, v in stage.unet.state_dict().items()}
    optimizer = make_optimizer(run.train, list(stage.unet.parameters()), fused=False)
    opt_state = optimizer.state_dict()  # no moments yet, so restored as this (index-keyed)
    state = {"samples_seen": 0, "bad_steps": 0}
    return save_checkpoint(Path(out), 0, weights, dict(weights), opt_state, state, keep=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--from", dest="source", required=True, help="a stored stage directory")
    p.add_argument("--out", required=True, help="a new run directory")
    a = p.parse_args()
    torch.manual_seed(0)
    print(warm_start(a.config, a.stage, a.source, a.out))


if __name__ == "__main__":
    main()
