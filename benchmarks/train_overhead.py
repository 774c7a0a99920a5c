"""The trainer against its bare step, on this machine (the CPU side of benchmarks/gpu.py):
samples/s of one bare training step of a preset (forward, backward, fused AdamW, bf16
autocast) and of `imagen train`'s code on the same preset and batch for a short run (data,
per-sample draws, caption table, EMA, logging), and their ratio ``trainer_over_step``.
Writes benchmarks/results/train_overhead-DEVICE-DATE.json.

    python benchmarks/train_overhead.py [--threads 2] [--preset shapes-base32] [--batch 32]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import sync, table, write
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
    ap.add_argument("--repeat", type=int, default=3, help="trainer runs (median reported)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cl = device.type == "cuda"  # the trainer's default memory format on each device
    rows = []
    step = make_step(args.preset, args.batch, device, True, cl)
    n = args.steps * 5 // 6  # the trainer's timed steps (its first sixth warms up)

    def bare_rate() -> float:
        """Mean samples/s over n steps (a mean, as the trainer's rate is)."""
        for _ in range(2):
            step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync(device)
        return args.batch * n / (time.perf_counter() - t0)

    for _ in range(args.repeat):  # the bare step right before and after each trainer run, so
        before = bare_rate()  # a drift in the machine's speed hits both sides alike
        run = trainer_rate(args.preset, args.batch, args.steps, device)
        trainer = run["samples_per_s"]
        bare = (before + bare_rate()) / 2
        rows.append(
            {
                "preset": args.preset,
                "batch": args.batch,
                "threads": args.threads,
                "step_samples_per_s": bare,
                "trainer_samples_per_s": trainer,
                "trainer_over_step": trainer / bare,
                "trainer_data_wait_fraction": run["data_wait_fraction"],
            }
        )
        print(table(rows[-1:], list(rows[-1])), flush=True)
    ratios = sorted(r["trainer_over_step"] for r in rows)
    median = ratios[len(ratios) // 2]
    path = write(
        f"train_overhead-{device.type}", {"rows": rows, "median_trainer_over_step": median}
    )
    print(f"median trainer_over_step {median:.3f}; wrote {path}")


if __name__ == "__main__":
    main()
