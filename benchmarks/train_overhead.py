"""The trainer against its bare step, on this machine (the CPU side of benchmarks/gpu.py):
samples/s of one bare training step of a preset (forward, backward, fused AdamW, bf16
autocast) and of `imagen train`'s code on the same preset and batch for a short run (data,
per-sample draws, caption table, EMA, logging), and their ratio ``trainer_over_step``.
Writes benchmarks/results/train_overhead-DEVICE-DATE.json.

    python benchmarks/train_overhead.py [--threads 2] [--preset shapes-base32] [--batch 32]
"""

from __future__ import annotations

import argparse

import torch
from common import table, timed, write
from train_throughput import make_step, trainer_rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default="shapes-base32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--steps", type=int, default=60, help="trainer steps (the first sixth warms up)"
    )
    ap.add_argument("--repeat", type=int, default=2, help="alternate bare step and trainer runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cl = device.type == "cuda"  # the trainer's default memory format on each device
    rows = []
    for _ in range(args.repeat):  # alternated, so a drift in machine speed hits both
        step = make_step(args.preset, args.batch, device, True, cl)
        bare = args.batch / timed(step, device, warmup=2, repeat=10)
        trainer = trainer_rate(args.preset, args.batch, args.steps, device)
        rows.append(
            {
                "preset": args.preset,
                "batch": args.batch,
                "threads": args.threads,
                "step_samples_per_s": bare,
                "trainer_samples_per_s": trainer,
                "trainer_over_step": trainer / bare,
            }
        )
        print(table(rows[-1:], list(rows[-1])), flush=True)
    path = write(f"train_overhead-{device.type}", {"rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
