"""A training run directory: the one place that knows its layout and its resume policy.

    RUN_DIR/training_options.json   the fully resolved config and the stage index
    RUN_DIR/log.jsonl               one JSON record per logged interval
    RUN_DIR/summary.json            the final counts of a run
    RUN_DIR/checkpoints/step_N/     model, EMA and optimiser state (see checkpoint.py)
    RUN_DIR/samples_N.png           validation grids

The trainer writes through it and ``imagen export`` reads through it. Nothing is written
until the run has something to keep (its first log record, sample grid or checkpoint): the
options are held until then, so a run that fails to start leaves no half-made run directory,
and the same command line (with ``--resume``) serves a first launch and every restart.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from imagen.models.stage import StageConfig
from imagen.training.checkpoint import (
    CheckpointError,
    checkpoint_dirs,
    read_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from imagen.utils.files import write_json

log = logging.getLogger(__name__)

OPTIONS_FILE = "training_options.json"
LOG_FILE = "log.jsonl"
SUMMARY_FILE = "summary.json"
VOCABULARY_FILE = "vocabulary.json"  # the words of the training captions, where known
CHECKPOINTS = "checkpoints"


class RunLog:
    """The run's log.jsonl, opened for appending on the first record written."""

    def __init__(self, run: RunDirectory) -> None:
        self.run = run
        self.file: Any = None

    def write(self, text: str) -> int:
        if self.file is None:
            self.run.materialize()
            self.file = open(self.run.path / LOG_FILE, "a")  # noqa: SIM115 - closed in close()
        return self.file.write(text)

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class RunDirectory:
    """Options, log, summary and checkpoints of one training run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._pending_options: dict[str, Any] | None = None
        self._pending_vocabulary: dict[str, Any] | None = None

    # ---- options -------------------------------------------------------------------------
    @property
    def options_path(self) -> Path:
        return self.path / OPTIONS_FILE

    def write_options(self, options: dict[str, Any]) -> None:
        """Record this run's options; they are written (atomically) with the run's first
        log record, sample grid or checkpoint."""
        self._pending_options = options

    def materialize(self) -> None:
        """Create the directory and write the pending options: the run now has output."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self._pending_options is not None:
            write_json(self.options_path, self._pending_options)
            self._pending_options = None
        if self._pending_vocabulary is not None:
            write_json(self.path / VOCABULARY_FILE, self._pending_vocabulary)
            self._pending_vocabulary = None

    def read_options(self) -> dict[str, Any]:
        if not self.options_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a training run (no {OPTIONS_FILE})")
        try:
            return json.loads(self.options_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.options_path} is not valid JSON: {e}") from e

    def stage_config(self) -> StageConfig:
        """The configuration of the stage this run trains."""
        opts = self.read_options()
        try:
            stage = opts["config"]["stages"][opts["stage_index"]]["stage"]
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"{self.options_path} has no stage configuration ({e!r})") from e
        return StageConfig.from_dict(stage)

    def text_encoder(self) -> dict[str, Any]:
        """The text encoder record of this run (from the stage, else the run's config)."""
        return self.stage_config().text_encoder or dict(
            self.read_options()["config"]["text_encoder"]
        )

    # ---- checkpoints ---------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (complete: not necessarily intact)."""
        return checkpoint_dirs(self.path / CHECKPOINTS)

    def previous_run(self) -> list[str]:
        """What here shows that a run was started in this directory before."""
        names = (OPTIONS_FILE, LOG_FILE, CHECKPOINTS)
        return [n for n in names if (self.path / n).exists()]

    def latest_checkpoint(self, files: tuple[str, ...] | None = None) -> Path:
        """The newest checkpoint that verifies (checksums of ``files``, all by default, and
        state.json); a damaged newer one is reported and skipped, never deleted. Raises when
        none is usable."""
        problems = []
        for ckpt in reversed(self.checkpoints()):
            try:
                verify_checkpoint(ckpt, *([files] if files else []))
            except CheckpointError as e:
                log.warning("skipping a damaged checkpoint: %s", e)
                problems.append(f"{ckpt.name}: {str(e).split(': ', 1)[-1]}")
                continue
            if problems:
                log.warning("using %s, the newest usable checkpoint", ckpt)
            return ckpt
        if not problems:
            raise FileNotFoundError(f"{self.path} has no complete checkpoint")
        raise ValueError(f"no usable checkpoint in {self.path}: {'; '.join(problems)}")

    def resume_checkpoint(self, resume: bool) -> Path | None:
        """The checkpoint a run starting here continues from: with ``resume`` the newest usable
        one, or None (a fresh start, logged) when the directory holds no previous run; without
        it None. Refuses to start afresh over a previous run, and to resume one that has no
        usable checkpoint (a mistyped --out or lost checkpoints must not restart at step 0)."""
        ckpts, before = self.checkpoints(), self.previous_run()
        if not resume:
            if ckpts:
                raise FileExistsError(
                    f"{self.path} already holds checkpoints; pass --resume or choose another --out"
                )
            if before:
                raise FileExistsError(
                    f"{self.path} holds a previous run ({', '.join(before)}) but no checkpoint; "
                    f"delete it or choose another --out"
                )
            return None
        if ckpts:
            ckpt = self.latest_checkpoint()
            if os.environ.get("RANK", "0") == "0":  # one process rewrites the log
                self.truncate_log(verify_checkpoint(ckpt, ())["step"])
            return ckpt
        if before:
            raise FileNotFoundError(
                f"cannot resume {self.path}: it holds a previous run ({', '.join(before)}) but no "
                f"checkpoint; delete it to start again, or check --out"
            )
        log.warning("--resume: %s holds no previous run; starting a new run at step 0", self.path)
        return None

    def save_checkpoint(
        self,
        step: int,
        model_state: dict[str, Tensor],
        ema_state: dict[str, Tensor],
        optimizer_state: dict[str, Any],
        state: dict[str, Any],
        keep: int,
    ) -> Path:
        self.materialize()
        return save_checkpoint(
            self.path / CHECKPOINTS, step, model_state, ema_state, optimizer_state, state, keep
        )

    @staticmethod
    def read_checkpoint(
        path: Path,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any], dict[str, Any]]:
        """Model, EMA and optimiser state and state.json of a checkpoint, verified first."""
        return read_checkpoint(path)

    # ---- log and summary -----------------------------------------------------------------
    def open_log(self) -> RunLog:
        return RunLog(self)

    def read_log(self) -> list[dict[str, Any]]:
        """The log's records; a line that does not parse (cut short by a killed run) is
        skipped with a warning."""
        path = self.path / LOG_FILE
        if not path.is_file():
            return []
        rows, bad = [], 0
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                row, bad = None, bad + 1
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        if bad:
            log.warning("%s: %d line(s) that are not JSON records skipped", path, bad)
        return rows

    def truncate_log(self, step: int) -> int:
        """Drop the log's records after ``step`` (the checkpoint a resumed run restarts from:
        the steps after it are run, and logged, again), so the log and its curves never go
        back in steps. Rewritten atomically; returns how many records were dropped."""
        path = self.path / LOG_FILE
        if not path.is_file():
            return 0
        rows = self.read_log()
        keep = [r for r in rows if r["step"] <= step]
        lines = path.read_text(errors="replace").splitlines()
        if len(keep) == len(rows) == len([ln for ln in lines if ln.strip()]):
            return 0
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        log.info(
            "%s: %d record(s) after step %d dropped (resumed)", path, len(rows) - len(keep), step
        )
        return len(rows) - len(keep)

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.materialize()
        write_json(self.path / SUMMARY_FILE, summary)

    def write_vocabulary(self, words: list[str]) -> None:
        """Record the words of the run's training captions (exported with the model), with the
        run's first output (a run that fails to start leaves nothing)."""
        self._pending_vocabulary = {"vocabulary": words}
        if self.path.is_dir() and self._pending_options is None:
            self.materialize()

    def vocabulary(self) -> list[str] | None:
        """The run's training vocabulary, or None when its captions were not known ahead."""
        path = self.path / VOCABULARY_FILE
        if not path.is_file():
            return None
        words = json.loads(path.read_text()).get("vocabulary")
        return [str(w) for w in words] if isinstance(words, list) else None

    def sample_grid_path(self, step: int) -> Path:
        """Where the sample grid of ``step`` goes (the directory exists once this is asked)."""
        self.materialize()
        return self.path / f"samples_{step:08d}.png"

    def curves_path(self) -> Path:
        """The picture of the run's loss and learning rate over steps."""
        return self.path / "curves.png"

    def training_record(self, ckpt: Path) -> dict[str, Any]:
        """Steps, images seen, wall time and hardware of the run up to ``ckpt``, from its log
        (for the model index that ``imagen export`` writes)."""
        rec: dict[str, Any] = {"run_dir": self.path.name, "checkpoint": ckpt.name}
        state = verify_checkpoint(ckpt, ())  # its record only: the weights are read elsewhere
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
