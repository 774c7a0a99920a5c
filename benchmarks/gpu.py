"""The GPU benchmark, sized to finish in under five minutes on one H100/H200 (sections are
skipped, and say so, when the time budget runs out).

Per preset: the bare training step's samples/s (forward, backward, fused AdamW; bf16
autocast, channels-last) with model FLOPs utilisation against the bf16 matmul peak measured in
the same run. For the preset with a trainer run (shapes-base32): the input pipeline's
samples/s alone, the real trainer's samples/s for a fixed short run (`imagen train`'s code:
data loading, draws, caption table, EMA, logging), then its own bare step on the same trainer
(its loss, backward and AdamW on a batch kept on the device: compiled once for both), their
ratio ``trainer_over_step`` and the share of its time the trainer waited for data. Each
preset's compiled measurements follow its eager ones (CUDA graphs for the small Shapes stage,
where the trainer compiles the whole micro-batch loss), the presets in the order of the
issue's targets; then sampling images/s of the bundled cascade per stage, eager and compiled,
while the budget allows. Each row records its seconds. Writes
benchmarks/results/gpu-cuda-DATE.json after every row.

    python benchmarks/gpu.py                      (on a machine with CUDA)
    python benchmarks/gpu.py --device cpu --quick (a smoke run of the same code)
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from common import matmul_peak, sync, table, timed, write
from sampling import time_stage
from train_throughput import loader_rate, make_step, step_flops, trainer_rate

from imagen.models.sampling import SamplingConfig
from imagen.pipeline import ImagenPipeline, compile_unets

# preset, batches to try (largest first; a batch that runs out of memory falls back), trainer
# steps (0: no trainer run), torch.compile modes to measure (the bare step, and the trainer when
# it has steps). reduce-overhead captures the forward and backward passes in CUDA graphs, for
# small launch-bound models.
PLAN = [
    ("shapes-base32", (256,), 200, ("reduce-overhead",)),
    ("paper-base64", (128, 64, 32), 0, ("default",)),
    ("paper-sr256", (16, 8), 0, ()),
    ("paper-sr1024", (4, 2), 0, ()),
]
QUICK = [("tiny-base", (8,), 12, ("default",))]
PREFIX = {"default": "compiled", "reduce-overhead": "cudagraphs", "max-autotune": "autotuned"}
SAMPLING = SamplingConfig(sampler="dpmpp", steps=20, guidance=3.0)


class Clock:
    """The run's time budget."""

    def __init__(self, budget: float) -> None:
        self.start, self.budget = time.time(), budget

    def left(self) -> float:
        return self.budget - (time.time() - self.start)


def bare_step(name: str, batch: int, device: torch.device, compile_mode: str | None) -> float:
    """Seconds per bare step (bf16, channels-last on CUDA), after warm-up; fast steps are timed
    in runs of up to 10 between syncs (as the trainer runs them)."""
    cl = device.type == "cuda"
    step = make_step(name, batch, device, True, cl, compile_mode)
    once = timed(step, device, warmup=3 if compile_mode else 2, repeat=1)
    sec = timed(step, device, warmup=0, repeat=5, calls=max(1, min(10, int(0.3 / once))))
    del step
    return sec


def largest_batch(name: str, batches: tuple[int, ...], device: torch.device) -> tuple[int, float]:
    """The largest batch of ``batches`` whose bare step fits in memory, and its step time."""
    for batch in batches:
        try:
            return batch, bare_step(name, batch, device, None)
        except torch.OutOfMemoryError:
            empty(device)
    raise torch.OutOfMemoryError(f"{name}: no batch of {batches} fits")


def empty(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_compiled(
    row: dict, plan_item: tuple, device: torch.device, peak: float, clock: Clock
) -> None:
    """Add a preset's compiled measurements to its ``row`` while the time budget allows."""
    name, _, steps, modes = plan_item
    for mode in modes:
        if "batch" not in row or clock.left() < 90:
            row.setdefault("skipped", []).append(f"{mode}: time budget")
            continue
        try:
            flops = step_flops(name, 1, device) * row["batch"]
            row.update(measure(name, row["batch"], steps, device, mode, flops / peak))
        except torch.OutOfMemoryError as e:
            row[f"{PREFIX[mode]}_error"] = f"out of memory: {e}"[:200]
        finally:
            empty(device)


def eager_row(
    name: str, batches: tuple, steps: int, device: torch.device, peak: float, clock: Clock
) -> dict[str, Any]:
    """A preset's eager measurements: with trainer ``steps``, the input pipeline alone, then
    the trainer and its own step (:func:`measure`) at the first of ``batches``; else the bare
    step at the largest batch that fits. Each step with its MFU."""
    if clock.left() < 60:
        return {"preset": name, "skipped": ["time budget"]}
    try:
        if not steps:
            batch, sec = largest_batch(name, batches, device)
            mfu = step_flops(name, 1, device) * batch / sec / peak
            return {
                "preset": name,
                "batch": batch,
                "step_samples_per_s": batch / sec,
                "mfu_bf16": mfu,
            }
        batch = batches[0]
        row: dict[str, Any] = {"preset": name, "batch": batch}
        row["loader_samples_per_s"] = loader_rate(name, batch, 100, device)
        flops = step_flops(name, 1, device) * batch
        row.update(measure(name, batch, steps, device, None, flops / peak))
        return row
    except torch.OutOfMemoryError as e:
        return {"preset": name, "error": f"out of memory: {e}"[:200]}
    finally:
        empty(device)


def measure(
    name: str, batch: int, steps: int, device: torch.device, mode: str | None, flop_frac: float
) -> dict[str, float]:
    """The step's samples/s and MFU (``flop_frac``: the step's FLOPs over the peak), eager
    (``mode`` None) or compiled in ``mode``. With trainer ``steps``: the real trainer's run,
    then its own bare step on the same trainer (`train_throughput.trainer_step`: one
    compilation serves both), and their ratio; else the bare step of `make_step`."""
    key = f"{PREFIX[mode]}_" if mode else ""
    if not steps:
        rate = batch / bare_step(name, batch, device, mode)
        return {f"{key}step_samples_per_s": rate, f"{key}mfu_bf16": flop_frac * rate / batch}
    run = trainer_rate(name, batch, steps, device, compile_mode=mode, own_step=True)
    rate = run["step_samples_per_s"]
    return {
        f"{key}step_samples_per_s": rate,
        f"{key}mfu_bf16": flop_frac * rate / batch,
        f"{key}trainer_samples_per_s": run["samples_per_s"],
        f"{key}trainer_over_step": run["samples_per_s"] / rate,
        f"{key}trainer_data_wait_fraction": run["data_wait_fraction"],
        f"{key}trainer_loss": run["loss"],
    }


def sampling_rows(pipe: ImagenPipeline, device: torch.device, batch: int, clock: Clock) -> list:
    """Eager bf16 images/s of each stage of the bundled cascade (20 DPM-Solver++ steps,
    guidance 3)."""
    rows = []
    for k in range(len(pipe.cascade.stages)):
        if clock.left() < 20:
            rows.append({"stage": k, "skipped": "time budget"})
            continue
        sec = time_stage(pipe, k, batch, SAMPLING, device, torch.bfloat16)
        rows.append({"stage": k, "batch": batch, "bf16_images_per_s": batch / sec})
        print(table(rows[-1:], list(rows[-1])), flush=True)
    return rows


def compile_sampling_rows(
    pipe: ImagenPipeline, rows: list[dict], device: torch.device, clock: Clock, save: Any
) -> None:
    """Add each stage's compiled images/s to its row while the time budget allows."""
    for row in rows:
        if "batch" not in row or clock.left() < 60:
            row["compile_skipped"] = "time budget"
            continue
        k, started = row["stage"], time.time()
        compile_unets(pipe.cascade, stages=[k])
        sec = time_stage(pipe, k, row["batch"], SAMPLING, device, torch.bfloat16)
        pipe.cascade.stages[k].compiled = None
        row["bf16_compile_images_per_s"] = row["batch"] / sec
        row["compile_over_eager"] = row["bf16_compile_images_per_s"] / row["bf16_images_per_s"]
        row["compile_seconds"] = time.time() - started
        save()
        print(table([row], list(row)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds for the whole run")
    args = ap.parse_args()
    device = torch.device(args.device)
    clock = Clock(args.budget)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    n = 8192 if device.type == "cuda" else 1024
    peak = matmul_peak(device, torch.bfloat16, n)
    print(f"bf16 matmul peak {peak / 1e12:.1f} TFLOP/s", flush=True)
    result: dict[str, Any] = {"peak_bf16_flops": peak, "train": [], "sampling": []}

    def save() -> None:  # after every row, so a run cut short keeps what it measured
        result["seconds"] = time.time() - clock.start
        write(f"gpu-{device.type}", result)

    for item in QUICK if args.quick else PLAN:  # each preset eager, then compiled
        name, batches, steps, _ = item
        started = time.time()
        result["train"].append(eager_row(name, batches, steps, device, peak, clock))
        result["train"][-1]["eager_seconds"] = time.time() - started
        save()
        print(table(result["train"][-1:], list(result["train"][-1])), flush=True)
        started = time.time()  # compiling included: what the budget has to allow for
        add_compiled(result["train"][-1], item, device, peak, clock)
        result["train"][-1]["compiled_seconds"] = time.time() - started
        save()
        print(table(result["train"][-1:], list(result["train"][-1])), flush=True)
    try:
        pipe = ImagenPipeline.from_pretrained(None, device)
    except ImportError as e:  # the bundled model's text encoder package is not installed
        pipe, result["sampling"] = None, [{"skipped": str(e)}]
        print(f"sampling skipped: {e}", flush=True)
    if pipe is not None:
        result["sampling"] = sampling_rows(pipe, device, 8 if args.quick else 64, clock)
    save()
    if pipe is not None:
        compile_sampling_rows(pipe, result["sampling"], device, clock, save)
    save()
    sync(device)
    print(f"done in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
