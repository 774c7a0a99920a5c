"""A small base model trained from scratch in minutes on the Shapes data: what ``imagen demo
--train`` shows, and a fixture the tests train."""

from __future__ import annotations

from pathlib import Path

from imagen.models.presets import shapes_base32
from imagen.text.encoders import TextEncoderConfig
from imagen.training.config import CascadeRunConfig, StageRun, TrainConfig
from imagen.training.export import export_model
from imagen.training.rundir import RunDirectory
from imagen.training.trainer import train_stage


def train_small_base(out_dir: Path, minutes: float, seed: int) -> tuple[Path, Path]:
    """Train a small 32 px base model on Shapes for ``minutes`` (in ``OUT_DIR/train-run``) and
    export it (``OUT_DIR/trained-model``); returns the model directory and the run's training
    curves picture."""
    stage = shapes_base32()
    train = TrainConfig(
        batch_size=32,
        max_steps=1_000_000,
        lr=5e-4,
        warmup_steps=100,
        ema_decay=0.995,
        sample_every=0,
        checkpoint_every=500,
        time_budget_s=minutes * 60,
        seed=seed,
    )
    cfg = CascadeRunConfig(TextEncoderConfig("minilm", 32), stages=[StageRun(stage, train)])
    run = out_dir / "train-run"
    train_stage(cfg, 0, run, resume=True)
    return export_model([run], out_dir / "trained-model"), RunDirectory(run).curves_path()
