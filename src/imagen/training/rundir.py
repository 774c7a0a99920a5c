"""A training run directory: the one place that knows its layout.

    RUN_DIR/training_options.json   the fully resolved config and the stage index
    RUN_DIR/log.jsonl               one JSON record per logged interval
    RUN_DIR/summary.json            the final counts of a run
    RUN_DIR/checkpoints/step_N/     model, EMA and optimiser state (see checkpoint.py)
    RUN_DIR/samples_N.png           validation grids

The trainer writes through it and ``imagen export`` reads through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from torch import Tensor

from imagen.models.stage import StageConfig
from imagen.training.checkpoint import checkpoint_dirs, read_checkpoint, save_checkpoint

OPTIONS_FILE = "training_options.json"
LOG_FILE = "log.jsonl"
SUMMARY_FILE = "summary.json"


class RunDirectory:
    """Options, log, summary and checkpoints of one training run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # ---- options -------------------------------------------------------------------------
    @property
    def options_path(self) -> Path:
        return self.path / OPTIONS_FILE

    def write_options(self, options: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.options_path.write_text(json.dumps(options, indent=2) + "\n")

    def read_options(self) -> dict[str, Any]:
        if not self.options_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a training run (no {OPTIONS_FILE})")
        return json.loads(self.options_path.read_text())

    def stage_config(self) -> StageConfig:
        """The configuration of the stage this run trains."""
        opts = self.read_options()
        return StageConfig.from_dict(opts["config"]["stages"][opts["stage_index"]]["stage"])

    def text_encoder(self) -> dict[str, Any]:
        """The text encoder record of this run (from the stage, else the run's config)."""
        return self.stage_config().text_encoder or dict(
            self.read_options()["config"]["text_encoder"]
        )

    # ---- checkpoints ---------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return checkpoint_dirs(self.path)

    def resume_checkpoint(self, resume: bool) -> Path | None:
        """The checkpoint a run starting here continues from: the newest with ``resume``, None
        for a fresh run; refuses to start afresh over existing checkpoints."""
        ckpts = self.checkpoints()
        if ckpts and not resume:
            raise FileExistsError(
                f"{self.path} already holds checkpoints; pass --resume or choose another --out"
            )
        return ckpts[-1] if resume and ckpts else None

    def save_checkpoint(
        self,
        step: int,
        model_state: dict[str, Tensor],
        ema_state: dict[str, Tensor],
        optimizer_state: dict[str, Any],
        state: dict[str, Any],
        keep: int,
    ) -> Path:
        return save_checkpoint(
            self.path, step, model_state, ema_state, optimizer_state, state, keep
        )

    @staticmethod
    def read_checkpoint(
        path: Path,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any], dict[str, Any]]:
        return read_checkpoint(path)

    # ---- log and summary -----------------------------------------------------------------
    def open_log(self) -> IO[str]:
        return open(self.path / LOG_FILE, "a")  # noqa: SIM115 - closed by the trainer

    def read_log(self) -> list[dict[str, Any]]:
        path = self.path / LOG_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_summary(self, summary: dict[str, Any]) -> None:
        (self.path / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")

    def sample_grid_path(self, step: int) -> Path:
        return self.path / f"samples_{step:08d}.png"

    def training_record(self, ckpt: Path) -> dict[str, Any]:
        """Steps, images seen, wall time and hardware of the run up to ``ckpt``, from its log
        (for the model index that ``imagen export`` writes)."""
        rec: dict[str, Any] = {"run_dir": self.path.name, "checkpoint": ckpt.name}
        state = json.loads((ckpt / "state.json").read_text())
        rec["steps"] = state["step"]
        rec["samples_seen"] = state["samples_seen"]
        rows = [r for r in self.read_log() if r["step"] <= state["step"]]
        if rows:
            # sums over the logged intervals: robust to restarts (resumed runs append to the
            # log; steps redone after a restart count in the wall time, as they cost it)
            wall = sum(r.get("log_interval_s", 0.0) for r in rows)
            rec["wall_time_s"] = round(wall, 1)
            rec["final_loss"] = rows[-1]["loss"]
            hardware: dict[str, float] = {}
            for r in rows:
                key = r.get("hardware") or "unknown"
                hardware[key] = hardware.get(key, 0.0) + r.get("log_interval_s", 0.0)
            rec["hardware"] = {k: f"{v / 60:.0f} min" for k, v in hardware.items()}
        return rec
