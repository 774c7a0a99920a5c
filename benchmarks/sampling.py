"""Sampling speed: images/s and latency per sampler, step count and guidance, for each stage of
a model and for the whole cascade; peak memory; and the before/after ratios of bf16 autocast
(and, with --compile, torch.compile) measured in the same run.

    python benchmarks/sampling.py [--model DIR] [--device cpu|cuda] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import peak_rss_mb, sync, table, write

from imagen.models.sampling import SamplingConfig
from imagen.pipeline import ImagenPipeline


def stage_inputs(pipe: ImagenPipeline, k: int, batch: int, device: torch.device):
    text = pipe.cascade.text_encoder.encode(["a red circle on the left"] * batch)
    st = pipe.cascade.stages[k]
    low = None
    if st.config.is_super_resolution:
        n = st.config.lowres_size
        low = torch.rand(batch, 3, n, n, device=device) * 2 - 1
    return st, text, low


def time_stage(pipe, k, batch, sampling, device, autocast=None, repeat=2) -> float:
    st, text, low = stage_inputs(pipe, k, batch, device)
    st.sample(text, low, sampling, torch.Generator(device).manual_seed(0), autocast)  # warm-up
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        st.sample(text, low, sampling, torch.Generator(device).manual_seed(0), autocast)
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="model directory (default: the bundled cascade)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile")
    ap.add_argument("--steps", nargs="*", type=int, default=[10, 20, 50])
    ap.add_argument("--samplers", nargs="*", default=["ddpm", "ddim", "dpmpp"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pipe = ImagenPipeline.from_pretrained(args.model, device)
    rows = []
    samplers = ["dpmpp"] if args.quick else args.samplers
    step_counts = [10] if args.quick else args.steps
    for k, st in enumerate(pipe.cascade.stages):
        for sampler in samplers:
            for steps in step_counts:
                for guidance in (1.0, 3.0):
                    s = SamplingConfig(sampler=sampler, steps=steps, guidance=guidance)
                    sec = time_stage(pipe, k, args.batch, s, device)
                    rows.append(
                        {
                            "stage": k,
                            "resolution": st.config.resolution,
                            "sampler": sampler,
                            "steps": steps,
                            "guidance": guidance,
                            "batch": args.batch,
                            "latency_s": sec,
                            "images_per_s": args.batch / sec,
                        }
                    )
                    print(table(rows[-1:], list(rows[-1])), flush=True)
    # the whole cascade with its default settings (20 DPM-Solver++ steps, guidance 3 per stage)
    prompts = ["a red circle on the left"] * args.batch
    pipe(prompts[:1], steps=2)
    sync(device)
    t0 = time.perf_counter()
    pipe(prompts, batch_size=args.batch)
    sync(device)
    cascade_s = time.perf_counter() - t0
    cascade = {
        "batch": args.batch,
        "latency_s": cascade_s,
        "images_per_s": args.batch / cascade_s,
        "settings": "model defaults",
        "peak_rss_mb": peak_rss_mb(),
    }
    if device.type == "cuda":
        cascade["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    speedups = []
    s20 = SamplingConfig(sampler="dpmpp", steps=10 if args.quick else 20, guidance=3.0)
    for k in range(len(pipe.cascade.stages)):
        fp32 = time_stage(pipe, k, args.batch, s20, device)
        bf16 = time_stage(pipe, k, args.batch, s20, device, torch.bfloat16)
        entry = {"stage": k, "bf16_over_fp32": fp32 / bf16}
        if args.compile:
            from imagen.pipeline import compile_unets

            eager = pipe.cascade.stages[k].unet
            compile_unets(pipe.cascade, stages=[k])
            entry["compile_over_eager_fp32"] = fp32 / time_stage(pipe, k, args.batch, s20, device)
            pipe.cascade.stages[k].unet = eager
        speedups.append(entry)
    print()
    print(
        table(
            rows,
            ["stage", "resolution", "sampler", "steps", "guidance", "latency_s", "images_per_s"],
        )
    )
    print(
        f"\nwhole cascade, batch {args.batch}: {cascade['images_per_s']:.2f} images/s, "
        f"{cascade['latency_s']:.2f} s, peak RSS {cascade['peak_rss_mb']:.0f} MB"
    )
    print(table(speedups, list(speedups[0])))
    path = write(
        f"sampling-{device.type}",
        {"model": args.model or "bundled", "rows": rows, "cascade": cascade, "speedups": speedups},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
