"""Smoke benchmark: training-step throughput and sampling images/s of a tiny model.

Not a test: prints numbers so later changes can be compared (run before and after, same machine).
    python benchmarks/smoke.py [--threads N]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from imagen.diffusion.guidance import Conditioning
from imagen.diffusion.schedules import NoiseSchedule
from imagen.models.presets import tiny_base
from imagen.models.sampling import SamplingConfig
from imagen.models.stage import Stage
from imagen.text.encoders import HashTextEncoder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    enc = HashTextEncoder(32, 12)
    stage = Stage(tiny_base(args.size, 32))
    sch: NoiseSchedule = stage.schedule
    text = enc.encode(["a red circle on the left"] * args.batch)
    opt = torch.optim.AdamW(stage.unet.parameters(), 1e-4)
    x0 = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1
    results = {}
    for precision in ("fp32", "bf16"):
        times = []
        for i in range(12):
            t0 = time.perf_counter()
            t = torch.randint(0, 1000, (args.batch,))
            noise = torch.randn_like(x0)
            cond = Conditioning(text.tokens, text.mask)
            with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                pred = stage.unet(sch.q_sample(x0, t, noise), t.float(), cond.text, cond.mask)
            loss = (pred.float() - noise).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        results[f"train_samples_per_s_{precision}"] = args.batch / (sum(times) / len(times))
    stage.eval()
    for sampler, guidance in (("dpmpp", 1.0), ("dpmpp", 3.0), ("ddim", 3.0), ("ddpm", 3.0)):
        s = SamplingConfig(sampler=sampler, steps=20, guidance=guidance)
        t0 = time.perf_counter()
        stage.sample(text, sampling=s, generator=torch.Generator().manual_seed(0))
        dt = time.perf_counter() - t0
        results[f"sample_images_per_s_{sampler}_20steps_g{guidance:g}"] = args.batch / dt
    width = max(map(len, results))
    for k, v in results.items():
        print(f"{k:<{width}}  {v:10.1f}")
    print(json.dumps({"threads": args.threads, "size": args.size, "batch": args.batch, **results}))


if __name__ == "__main__":
    main()
