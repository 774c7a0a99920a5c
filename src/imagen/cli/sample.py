"""``imagen sample`` (prompts -> PNG files, a manifest.jsonl and a captioned grid.png) and
``imagen upscale`` (images -> the model's super-resolution stages -> PNGs and a manifest).

The option names are a contract other tools rely on; keep them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagen.cli.common import (
    UsageError,
    add_model_options,
    add_sampling_options,
    checked_configs,
    command,
    finite_float,
    load_pipeline,
    positive_int,
    sampling_overrides,
    unit_float,
)
from imagen.cli.output import StagedOutput

if TYPE_CHECKING:
    from PIL import Image

    from imagen.models.stage import SamplingConfig
    from imagen.pipeline import ImagenPipeline, PipelineOutput, Progress


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``sample`` and ``upscale`` commands."""
    s = sub.add_parser("sample", help="generate images from prompts")
    s.add_argument("prompts", nargs="*", metavar="PROMPT", help="text prompt(s)")
    s.add_argument("--prompts-file", help="file with one prompt per line")
    s.add_argument("--negative-prompt", default="", help="what guidance steers away from")
    s.add_argument("--out", default="samples", help="output directory (default: samples)")
    add_sampling_options(s, per_stage=True)
    s.add_argument(
        "--seed", type=int, default=0, help="seed of the first image (image j: seed + j)"
    )
    s.add_argument("--num-images", type=positive_int, default=1, help="images per prompt")
    s.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass")
    s.add_argument("--init-image", help="image-to-image / inpainting input")
    s.add_argument("--strength", type=unit_float, default=0.7, help="img2img strength in [0, 1]")
    s.add_argument("--mask", help="inpainting mask (white = regenerate)")
    s.add_argument("--save-stages", action="store_true", help="also save every stage's images")
    add_model_options(s)

    u = sub.add_parser("upscale", help="run images through the model's super-resolution stages")
    u.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s) to upscale")
    u.add_argument("--prompt", required=True, help="what the images show")
    u.add_argument("--negative-prompt", default="", help="what guidance steers away from")
    u.add_argument("--out", default="upscaled", help="output directory (default: upscaled)")
    u.add_argument("--steps", type=positive_int, help="sampling steps of every SR stage")
    u.add_argument("--guidance", type=finite_float, help="guidance scale of every SR stage")
    u.add_argument("--aug-level", type=finite_float, help="noise-augmentation level of the input")
    u.add_argument("--seed", type=int, default=0, help="seed of the first image")
    u.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass")
    u.set_defaults(sampler=None, threshold=None)
    add_model_options(u)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = [p for p in args.prompts if p.strip()]
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UsageError(f"prompts file not found: {path}")
        try:
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError:
            raise UsageError(f"prompts file is not UTF-8 text: {path}") from None
        from_file = [ln for ln in lines if ln]
        if not from_file:
            raise UsageError(f"prompts file is empty: {path}")
        prompts += from_file
    if not prompts:
        raise UsageError("no prompt given (pass PROMPT ... or --prompts-file FILE)")
    return prompts


def open_image(path: str | None, flag: str, mode: str = "RGB") -> Image.Image | None:
    """The image at ``path`` (None if no path), or a UsageError naming ``flag``."""
    if not path:
        return None
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise UsageError(f"{flag} file not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"{flag} {path}: not a readable image ({e})") from None


class ProgressBars:
    """One tqdm bar per stage, counting image-steps."""

    def __init__(self, names: list[str], totals: list[int]) -> None:
        from tqdm import tqdm

        self.bars = [
            tqdm(total=t, desc=n, unit="img-step", leave=True)
            for n, t in zip(names, totals, strict=True)
        ]

    def __call__(self, p: Progress) -> None:
        self.bars[p.stage].update(p.batch_size)

    def close(self) -> None:
        for b in self.bars:
            b.close()


def progress_bars(
    pipe: ImagenPipeline, configs: list[SamplingConfig], images: int, start: int = 0
) -> ProgressBars:
    stages = pipe.cascade.stages
    return ProgressBars(
        [f"stage {k} ({stages[k].config.resolution}px)" for k in range(start, len(stages))],
        [images * c.steps for c in configs[start:]],
    )


@command("sample")
def cmd_sample(args: argparse.Namespace) -> int:
    prompts = read_prompts(args)
    init = open_image(args.init_image, "--init-image")
    mask = open_image(args.mask, "--mask", "L")
    if mask and not init:
        raise UsageError("--mask needs --init-image")
    from imagen.pipeline import resolve_model

    model = resolve_model(args.model)
    with StagedOutput(args.out) as staged:
        pipe = load_pipeline(args, model)
        configs = checked_configs(pipe, args)
        bars = progress_bars(pipe, configs, len(prompts) * args.num_images)
        out = pipe(
            prompts,
            args.num_images,
            seed=args.seed,
            batch_size=args.batch_size,
            return_all_stages=args.save_stages,
            init_image=init,
            strength=args.strength,
            mask=mask,
            progress=bars,
            negative_prompt=args.negative_prompt,
            overrides=sampling_overrides(args),
        )
        bars.close()
        write_outputs(staged, out, str(model), args.save_stages)
        write_grid(staged, out)
        target = staged.commit()
    print(f"wrote {len(out.images)} image(s), manifest.jsonl and grid.png to {target}")
    return 0


@command("upscale")
def cmd_upscale(args: argparse.Namespace) -> int:
    images = [open_image(p, "IMAGE") for p in args.images]
    if not args.prompt.strip():
        raise UsageError("--prompt is empty")
    from imagen.pipeline import resolve_model

    model = resolve_model(args.model)
    with StagedOutput(args.out) as staged:
        pipe = load_pipeline(args, model)
        configs = checked_configs(pipe, args)
        start = pipe.upscale_start(max(images[0].size))
        bars = progress_bars(pipe, configs, len(images), start)
        out = pipe.upscale(
            images,
            args.prompt,
            sampling_overrides(args),
            seed=args.seed,
            batch_size=args.batch_size,
            negative_prompt=args.negative_prompt,
            progress=bars,
        )
        bars.close()
        write_outputs(staged, out, str(model), sources=args.images)
        target = staged.commit()
    print(f"upscaled {len(out.images)} image(s) to {out.images[0].size[0]} px in {target}")
    return 0


def write_outputs(
    staged: StagedOutput,
    out: PipelineOutput,
    model: str,
    save_stages: bool = False,
    sources: list[str] | None = None,
) -> None:
    """The PNGs and manifest.jsonl of a run (one row per image, with its settings)."""
    from imagen.pipeline import sampling_summary

    settings = sampling_summary(out.sampling)
    with open(staged.path("manifest.jsonl"), "w", encoding="utf-8") as f:
        for j, (img, prompt, seed) in enumerate(
            zip(out.images, out.prompts, out.seeds, strict=True)
        ):
            name = f"{j:04d}.png"
            img.save(staged.path(name))
            rec: dict[str, Any] = {
                "prompt": prompt,
                "seed": seed,
                "path": name,
                "size": list(img.size),
                "model": model,
                "stages": settings,
            }
            if out.negative_prompts:
                rec["negative_prompt"] = out.negative_prompts[j]
            if sources is not None:
                rec["source"] = sources[j]
            if save_stages:
                rec["stage_paths"] = []
                for k, imgs in enumerate(out.stages[:-1]):
                    sname = f"{j:04d}_stage{k}.png"
                    imgs[j].save(staged.path(sname))
                    rec["stage_paths"].append(sname)
            f.write(json.dumps(rec) + "\n")


def write_grid(staged: StagedOutput, out: PipelineOutput) -> None:
    from imagen.utils.grid import captioned_grid

    captioned_grid(
        out.images,
        [f"{p} (seed {s})" for p, s in zip(out.prompts, out.seeds, strict=True)],
        columns=min(6, len(out.images)),
    ).save(staged.path("grid.png"))
