"""Training throughput of each preset stage size, with model FLOPs utilisation.

For each preset and batch size: samples/s of a full training step (forward, backward, AdamW),
the model FLOPs of one step (counted by torch.utils.flop_counter), and that rate as a fraction
of this machine's dense matmul peak measured in the same run (fp32 and bf16). Also the
before/after ratios of bf16 autocast and channels-last.

    python benchmarks/train_throughput.py [--device cpu|cuda] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections.abc import Callable

import torch
from common import matmul_peak, sync, table, timed, write
from torch.utils.flop_counter import FlopCounterMode

from imagen.diffusion.guidance import Conditioning
from imagen.diffusion.schedules import NoiseSchedule
from imagen.models.presets import count_preset_parameters, get_preset
from imagen.models.unet import UNet
from imagen.text.encoders import TextEncoderConfig
from imagen.training.config import CascadeRunConfig, DataConfig, StageRun, TrainConfig
from imagen.training.data import DrawSpec, draw_batch, training_batches
from imagen.training.parallel import Dist
from imagen.training.rundir import RunDirectory
from imagen.training.trainer import Trainer


def make_step(
    name: str,
    batch: int,
    device: torch.device,
    bf16: bool,
    channels_last: bool,
    compile_mode: str | None = None,
    checkpointing: bool = False,
):
    """One bare training step of preset ``name`` (forward, backward, fused AdamW as the trainer
    uses), optionally with the U-Net compiled (``compile_mode``: default, reduce-overhead,
    max-autotune) and activation checkpointing."""
    cfg = get_preset(name)
    with torch.device(device):
        model = UNet(cfg.unet)
    mem = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=mem)
    model.activation_checkpointing = checkpointing
    opt = torch.optim.AdamW(model.parameters(), 1e-4, fused=device.type in ("cuda", "cpu"))
    net = torch.compile(model, mode=compile_mode, dynamic=False) if compile_mode else model
    sch = NoiseSchedule(cfg.diffusion)
    n, d = cfg.resolution, cfg.unet.text_dim
    x0 = (torch.rand(batch, 3, n, n, device=device) * 2 - 1).contiguous(memory_format=mem)
    cond = Conditioning(
        torch.randn(batch, 16, d, device=device),
        torch.ones(batch, 16, dtype=torch.bool, device=device),
    )
    if cfg.is_super_resolution:
        cond.lowres, cond.aug_level = x0.clone(), torch.zeros(batch, device=device)

    def step() -> None:
        if compile_mode:  # a new iteration for CUDA-graph trees (reduce-overhead)
            torch.compiler.cudagraph_mark_step_begin()
        t = torch.randint(0, sch.num_timesteps, (batch,), device=device)
        noise = torch.randn_like(x0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = net(
                sch.q_sample(x0, t, noise),
                t.float(),
                cond.text,
                cond.mask,
                cond.lowres,
                cond.aug_level,
            )
        loss = (pred.float() - noise).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


@functools.cache  # a paper preset's model takes seconds to build
def step_flops(name: str, batch: int, device: torch.device | None = None) -> int:
    """FLOPs of one forward + backward pass (the optimiser's elementwise work is not counted;
    the count is the same on any device)."""
    step = make_step(name, batch, device or torch.device("cpu"), bf16=False, channels_last=False)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def trainer_rate(
    name: str,
    batch: int,
    steps: int,
    device: torch.device,
    compile_mode: str | None = None,
    own_step: bool = False,
) -> dict[str, float]:
    """The real trainer on ``name`` (Shapes data, a weightless text encoder of the preset's
    width) over the logged intervals after the first: its ``samples_per_s``, the fraction of
    the time it waited for data (``data_wait_fraction``) and its mean ``loss`` (the same data
    and draws in every mode, so compiled and eager runs should agree closely);
    ``compile_mode``: compiled in that torch.compile mode. With ``own_step``, also
    ``step_samples_per_s``: the same trainer's bare step (:func:`trainer_step`) timed after its
    run, so one compilation serves both."""
    stage = get_preset(name)
    log_every = max(1, steps // 6)
    train = TrainConfig(
        batch_size=batch,
        max_steps=steps,
        lr=1e-4,
        warmup_steps=10,
        log_every=log_every,
        checkpoint_every=10**9,
        sample_every=0,
        compile=compile_mode is not None,
        compile_mode=compile_mode or "default",
    )
    cfg = CascadeRunConfig(
        TextEncoderConfig(f"hash-{stage.unet.text_dim}", 16),
        DataConfig(),  # the trainer's automatic number of DataLoader workers
        [StageRun(stage, train)],
    )
    with tempfile.TemporaryDirectory() as run:
        trainer = Trainer(cfg, 0, run, device=str(device), progress=False)
        trainer.run()
        rows = RunDirectory(run).read_log()
    timed_rows = rows[1:] or rows
    seconds = sum(r["log_interval_s"] for r in timed_rows)
    steps_done = sum(r["steps_per_s"] * r["log_interval_s"] for r in timed_rows)
    waited = sum(r["data_wait_fraction"] * r["log_interval_s"] for r in timed_rows)
    result = {
        "samples_per_s": steps_done * batch / seconds,
        "data_wait_fraction": waited / seconds,
        "loss": sum(r["loss"] for r in timed_rows) / len(timed_rows),
    }
    if own_step:
        sec = timed(trainer_step(trainer), device, warmup=2, repeat=5, calls=10)
        result["step_samples_per_s"] = batch / sec
    return result


def trainer_step(trainer: Trainer) -> Callable[[], None]:
    """A trainer's bare step: its micro-batch loss (compiled when the run compiles: random
    draws, conditioning, U-Net, weighted error), backward and optimiser update, on one batch
    kept on the device. What each step of its run does, less data loading, caption lookup,
    gradient clipping, EMA and logging."""
    n, b = trainer.scfg.resolution, trainer.cfg.batch_size
    images = torch.rand(b, 3, n, n, device=trainer.dev) * 2 - 1
    images = images.contiguous(memory_format=trainer.memory_format)
    caption = next(iter(trainer.embed.row))  # a caption of the table its run compiled for
    text = trainer.embed([caption] * b)

    def step() -> None:
        if trainer.cfg.compile:  # a new iteration for CUDA-graph trees (reduce-overhead)
            torch.compiler.cudagraph_mark_step_begin()
        loss = trainer.loss_fn(images, text.tokens, text.mask, trainer.first, trainer.positions)
        loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step


def loader_rate(
    name: str, batch: int, batches: int, device: torch.device, workers: int | None = None
) -> float:
    """samples/s of the trainer's input pipeline alone for ``name``: Shapes images from the
    DataLoader workers copied to ``device``, and each batch's random draws made there, after a
    warm-up. What the trainer could reach if its step cost nothing."""
    stage = get_preset(name)
    train = TrainConfig(batch_size=batch, max_steps=batches + 10)
    spec = DrawSpec.of(stage, train, stage.diffusion.timesteps)
    data = DataConfig(num_workers=workers)  # None: automatic, as the trainer
    it, _ = training_batches(data, stage, train, Dist(), 0, device.type == "cuda")

    def take(i: int) -> None:
        images, _, _ = next(it)
        images.to(device, non_blocking=True)
        draw_batch(spec, i * batch, batch, device)

    for i in range(10):
        take(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(batches):
        take(i)
    sync(device)
    return batches * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--quick", action="store_true", help="one small preset, for a smoke run")
    ap.add_argument("--presets", nargs="*")
    ap.add_argument("--batches", nargs="*", type=int)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    presets = args.presets or (
        ["tiny-base"] if args.quick else ["shapes-base32", "shapes-sr64", "shapes-sr128"]
    )
    batches = args.batches or ([8] if args.quick else [8, 32])
    peak = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    print(
        f"matmul peak: fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s"
    )
    rows = []
    for name in presets:
        params = count_preset_parameters(get_preset(name))
        for batch in batches:
            flops = step_flops(name, batch)
            for precision, cl in (("fp32", False), ("bf16", False), ("bf16", True)):
                sec = timed(
                    make_step(name, batch, device, precision == "bf16", cl),
                    device,
                    warmup=2,
                    repeat=3 if args.quick else 5,
                )
                rate = flops / sec
                rows.append(
                    {
                        "preset": name,
                        "params_M": params / 1e6,
                        "batch": batch,
                        "precision": precision,
                        "channels_last": cl,
                        "samples_per_s": batch / sec,
                        "step_s": sec,
                        "gflop_per_step": flops / 1e9,
                        "achieved_gflops": rate / 1e9,
                        "mfu": rate / peak[precision],
                    }
                )
                print(table(rows[-1:], list(rows[-1])), flush=True)
    ratios = []
    for name in presets:
        for batch in batches:
            r = {
                (x["precision"], x["channels_last"]): x["samples_per_s"]
                for x in rows
                if x["preset"] == name and x["batch"] == batch
            }
            ratios.append(
                {
                    "preset": name,
                    "batch": batch,
                    "bf16_over_fp32": r[("bf16", False)] / r[("fp32", False)],
                    "channels_last_over_contiguous_bf16": r[("bf16", True)] / r[("bf16", False)],
                }
            )
    print()
    print(
        table(
            rows,
            [
                "preset",
                "batch",
                "precision",
                "channels_last",
                "samples_per_s",
                "gflop_per_step",
                "mfu",
            ],
        )
    )
    print()
    print(table(ratios, list(ratios[0])))
    path = write(
        f"train_throughput-{device.type}", {"peak_flops": peak, "rows": rows, "speedups": ratios}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
