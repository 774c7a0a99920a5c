"""The GPU benchmark: training throughput (with MFU against the measured bf16 matmul peak) of
the Shapes and paper presets, and sampling speed of the bundled cascade with bf16 autocast and
torch.compile, each against its baseline in the same run. Sized to finish in under five
minutes on one H100/H200. Writes benchmarks/results/gpu-DATE.json.

    python benchmarks/gpu.py            (on a machine with CUDA)
    python benchmarks/gpu.py --device cpu --quick   (a smoke run of the same code)
"""

from __future__ import annotations

import argparse
import time

import torch
from common import matmul_peak, sync, table, timed, write
from sampling import time_stage
from train_throughput import make_step, step_flops

from imagen.models.stage import SamplingConfig
from imagen.pipeline import ImagenPipeline, compile_unets


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    started = time.time()
    peak = {
        "fp32_tf32": matmul_peak(device, torch.float32, 8192 if device.type == "cuda" else 1024),
        "bf16": matmul_peak(device, torch.bfloat16, 8192 if device.type == "cuda" else 1024),
    }
    print({k: f"{v / 1e12:.1f} TFLOP/s" for k, v in peak.items()})
    plan = (
        [("tiny-base", 8)]
        if args.quick
        else [
            ("shapes-base32", 256),
            ("shapes-sr64", 128),
            ("shapes-sr128", 64),
            ("paper-sr1024", 1),
            ("paper-sr256", 4),
            ("paper-base64", 8),
        ]
    )
    train_rows = []
    for name, batch in plan:
        try:
            flops = (
                step_flops(name, 1) * batch if name.startswith("paper") else step_flops(name, batch)
            )
            for cl in (False, True):
                sec = timed(make_step(name, batch, device, True, cl), device, warmup=3, repeat=5)
                train_rows.append(
                    {
                        "preset": name,
                        "batch": batch,
                        "bf16": True,
                        "channels_last": cl,
                        "samples_per_s": batch / sec,
                        "mfu_bf16": flops / sec / peak["bf16"],
                    }
                )
                print(table(train_rows[-1:], list(train_rows[-1])), flush=True)
        except torch.OutOfMemoryError:
            train_rows.append({"preset": name, "batch": batch, "error": "out of memory"})
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    pipe = ImagenPipeline.from_pretrained(None, device)
    batch = 8 if args.quick else 64
    s = SamplingConfig(sampler="dpmpp", steps=20, guidance=3.0)
    sample_rows = []
    for k in range(len(pipe.cascade.stages)):
        fp32 = time_stage(pipe, k, batch, s, device)
        bf16 = time_stage(pipe, k, batch, s, device, torch.bfloat16)
        compile_unets(pipe.cascade, stages=[k])
        comp = time_stage(pipe, k, batch, s, device, torch.bfloat16)
        pipe.cascade.stages[k].compiled = None
        sample_rows.append(
            {
                "stage": k,
                "batch": batch,
                "fp32_images_per_s": batch / fp32,
                "bf16_images_per_s": batch / bf16,
                "bf16_compile_images_per_s": batch / comp,
                "bf16_over_fp32": fp32 / bf16,
                "compile_over_eager_bf16": bf16 / comp,
            }
        )
        print(table(sample_rows[-1:], list(sample_rows[-1])), flush=True)
    prompts = ["a red circle on the left"] * batch
    pipe(prompts, batch_size=batch)
    sync(device)
    t0 = time.perf_counter()
    pipe(prompts, batch_size=batch)
    sync(device)
    cascade = {"batch": batch, "images_per_s": batch / (time.perf_counter() - t0)}
    if device.type == "cuda":
        cascade["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    path = write(
        f"gpu-{device.type}",
        {
            "peak_flops": peak,
            "train": train_rows,
            "sampling": sample_rows,
            "cascade": cascade,
            "seconds": time.time() - started,
        },
    )
    print(f"wrote {path} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
