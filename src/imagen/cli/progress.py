"""The progress of ``imagen sample`` and ``imagen upscale``: one line per stage, counting
image-steps (a stage's total is the images times the steps that stage runs, as the pipeline
resolved them); a stage's line starts with its first step.

On a terminal each stage is a tqdm bar, drawn in place; warnings meanwhile go through tqdm's
writer (cli/messages.py), above the bars. Where stderr is a file or a pipe nothing is drawn in
place: each stage writes a plain line when it finishes, and one at most every
:data:`PLAIN_EVERY_S` seconds while it runs, so a log has no carriage returns or cursor
movements in it.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from imagen.cli.messages import adopt_library_loggers, terminal_width, write

if TYPE_CHECKING:
    from imagen.pipeline import ImagenPipeline, Progress

PLAIN_EVERY_S = 30.0
"""Where stderr is not a terminal: the most often a running stage's progress line is written."""


class ProgressBars:
    """One tqdm bar per stage, on a terminal."""

    def __init__(self, names: list[str], images: int) -> None:
        self.names, self.images = names, images
        self.bars: dict[int, Any] = {}

    def __call__(self, p: Progress) -> None:
        if p.stage not in self.bars:
            from tqdm import tqdm

            if not self.bars:
                adopt_library_loggers()  # what they log from now on is written above the bars
            self.bars[p.stage] = tqdm(
                total=self.images * p.steps, desc=self.names[p.stage], unit="img-step", leave=True
            )
        self.bars[p.stage].update(p.batch_size)

    def close(self) -> None:
        for b in self.bars.values():
            b.close()


class ProgressLines:
    """Each stage's progress as plain lines, where stderr is not a terminal."""

    def __init__(self, names: list[str], images: int) -> None:
        self.names, self.images = names, images
        self.stages: dict[int, list[float]] = {}  # stage -> [done, total, started]
        self.last = self.tick = time.monotonic()  # the last line written; the last step

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        # a stage started when the step before its first one ended (or when the run began)
        state = self.stages.setdefault(p.stage, [0, self.images * p.steps, self.tick])
        self.tick = now
        state[0] += p.batch_size
        done, total, started = state
        if done >= total:
            write(
                f"{self.names[p.stage]}: {int(done)}/{int(total)} img-steps in {now - started:.1f} s"
            )
            self.last = now
        elif now - self.last >= PLAIN_EVERY_S:
            write(
                f"{self.names[p.stage]}: {int(done)}/{int(total)} img-steps "
                f"({100 * done / total:.0f}%), {now - started:.0f} s so far"
            )
            self.last = now

    def close(self) -> None:
        """Nothing to close: every line is written whole."""


def progress_bars(
    pipe: ImagenPipeline, images: int, start: int = 0
) -> ProgressBars | ProgressLines:
    """The progress of a run of ``images`` images through the stages from ``start``: bars on a
    terminal, plain lines elsewhere."""
    stages = pipe.cascade.stages[start:]
    names = [f"stage {k} ({st.config.resolution}px)" for k, st in enumerate(stages, start)]
    if terminal_width(sys.stderr) is None:
        return ProgressLines(names, images)
    return ProgressBars(names, images)
