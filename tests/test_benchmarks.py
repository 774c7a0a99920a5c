"""The benchmarks' use of the trainer's internals: a refactor that breaks them should fail here,
not on a lent GPU machine."""

from __future__ import annotations

from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_trainer_rate_times_the_trainers_own_step(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from train_throughput import trainer_rate

    run = trainer_rate("tiny-base", 4, 12, torch.device("cpu"), own_step=True)
    assert run["samples_per_s"] > 0 and run["step_samples_per_s"] > 0
    assert 0 <= run["data_wait_fraction"] <= 1
    assert torch.isfinite(torch.tensor(run["loss"]))
