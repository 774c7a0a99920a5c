"""``imagen sample``: prompts -> PNG files, a manifest.jsonl and a captioned grid.png.

The option names are a contract other tools rely on; keep them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from imagen.cli.main import UsageError, command, positive_int


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"step counts must be positive, got {text!r}")
    return values


def add_sample_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sample", help="generate images from prompts")
    s.add_argument("prompts", nargs="*", metavar="PROMPT", help="text prompt(s)")
    s.add_argument("--prompts-file", help="file with one prompt per line")
    s.add_argument("--model", help="model directory (default: the bundled Shapes cascade)")
    s.add_argument("--out", default="samples", help="output directory (default: samples)")
    s.add_argument("--steps", type=positive_int, help="sampling steps for every stage")
    s.add_argument("--steps-per-stage", type=_int_list, help="e.g. 20,20,10 (overrides --steps)")
    s.add_argument("--guidance", type=float, help="guidance scale for every stage")
    s.add_argument(
        "--guidance-per-stage", type=_float_list, help="e.g. 3,3,1 (overrides --guidance)"
    )
    s.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"], help="sampler for every stage")
    s.add_argument("--threshold", type=float, help="dynamic-thresholding percentile, e.g. 0.995")
    s.add_argument("--aug-level", type=float, help="noise-augmentation level of SR stages")
    s.add_argument(
        "--seed", type=int, default=0, help="seed of the first image (image j: seed + j)"
    )
    s.add_argument("--num-images", type=positive_int, default=1, help="images per prompt")
    s.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass")
    s.add_argument("--init-image", help="image-to-image / inpainting input")
    s.add_argument("--strength", type=float, default=0.7, help="img2img strength in [0, 1]")
    s.add_argument("--mask", help="inpainting mask (white = regenerate)")
    s.add_argument("--save-stages", action="store_true", help="also save every stage's images")
    s.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    s.add_argument("--bf16", action="store_true", help="run the U-Nets under bf16 autocast")
    s.add_argument("--threads", type=positive_int, help="CPU threads for torch")


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = [p for p in args.prompts if p.strip()]
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UsageError(f"prompts file not found: {path}")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        from_file = [ln for ln in lines if ln]
        if not from_file:
            raise UsageError(f"prompts file is empty: {path}")
        prompts += from_file
    if not prompts:
        raise UsageError("no prompt given (pass PROMPT ... or --prompts-file FILE)")
    return prompts


@command("sample")
def cmd_sample(args: argparse.Namespace) -> int:
    prompts = read_prompts(args)
    from PIL import Image

    from imagen.models.model_dir import read_index
    from imagen.pipeline import BUNDLED_MODEL, ImagenPipeline
    from imagen.utils.grid import captioned_grid

    model_dir = Path(args.model) if args.model else BUNDLED_MODEL
    try:
        read_index(model_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    if not 0.0 <= args.strength <= 1.0:
        raise UsageError(f"--strength must be in [0, 1], got {args.strength}")
    for flag in ("init_image", "mask"):
        value = getattr(args, flag)
        if value and not Path(value).is_file():
            raise UsageError(f"--{flag.replace('_', '-')} file not found: {value}")
    if args.mask and not args.init_image:
        raise UsageError("--mask needs --init-image")
    import torch
    from tqdm import tqdm

    pipe = ImagenPipeline.from_pretrained(
        model_dir, args.device, torch.bfloat16 if args.bf16 else None
    )
    steps = args.steps_per_stage or args.steps
    guidance = args.guidance_per_stage or args.guidance
    try:  # validate every setting before anything is written
        configs = pipe.sampling_configs(
            steps, guidance, args.sampler, args.threshold, args.aug_level
        )
        init = Image.open(args.init_image).convert("RGB") if args.init_image else None
        mask = Image.open(args.mask) if args.mask else None
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None

    total = len(prompts) * args.num_images
    bars = [
        tqdm(
            total=total * c.steps,
            desc=f"stage {k} ({pipe.cascade.stages[k].config.resolution}px)",
            unit="img-step",
            leave=True,
        )
        for k, c in enumerate(configs)
    ]

    def progress(start: int, k: int, i: int, n: int) -> None:
        bars[k].update(min(args.batch_size, total - start))

    out = pipe(
        prompts,
        args.num_images,
        steps,
        guidance,
        args.sampler,
        args.threshold,
        args.aug_level,
        args.seed,
        args.batch_size,
        args.save_stages,
        init,
        args.strength,
        mask,
        progress,
    )
    for b in bars:
        b.close()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = [
        {
            "sampler": c.sampler,
            "steps": c.steps,
            "guidance": c.guidance,
            "threshold": c.threshold.percentile,
            "aug_level": c.aug_level,
        }
        for c in configs
    ]
    with open(out_dir / "manifest.jsonl", "w") as f:
        for j, (img, prompt, seed) in enumerate(
            zip(out.images, out.prompts, out.seeds, strict=True)
        ):
            name = f"{j:04d}.png"
            img.save(out_dir / name)
            rec = {
                "prompt": prompt,
                "seed": seed,
                "path": name,
                "size": list(img.size),
                "model": str(model_dir),
                "stages": settings,
            }
            if args.save_stages:
                rec["stage_paths"] = []
                for k, imgs in enumerate(out.stages[:-1]):
                    sname = f"{j:04d}_stage{k}.png"
                    imgs[j].save(out_dir / sname)
                    rec["stage_paths"].append(sname)
            f.write(json.dumps(rec) + "\n")
    captioned_grid(
        out.images,
        [f"{p} (seed {s})" for p, s in zip(out.prompts, out.seeds, strict=True)],
        columns=min(6, len(out.images)),
    ).save(out_dir / "grid.png")
    print(f"wrote {len(out.images)} image(s), manifest.jsonl and grid.png to {out_dir}")
    return 0
