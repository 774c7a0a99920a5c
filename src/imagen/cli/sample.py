"""``imagen sample`` (prompts -> PNG files, a manifest.jsonl and a captioned grid.png) and
``imagen upscale`` (images -> the model's super-resolution stages -> PNGs and a manifest).

The option names are a contract other tools rely on; keep them.

Work is streamed: prompts are read from ``--prompts-file`` as they are needed, and images are
generated, written and let go of one batch at a time, so memory depends on ``--batch-size``,
not on ``--num-images`` or the file's length (``grid.png`` shows the first
:data:`~imagen.pipeline.outputs.GRID_IMAGES`). An output directory holding an earlier run (its numbered PNGs,
grid.png or manifest.jsonl) is refused unless ``--overwrite`` is given; with it, that run's
files are replaced as a whole and other files there are kept.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagen.cli.common import (
    UsageError,
    add_model_options,
    add_sampling_options,
    command,
    finite_float,
    load_pipeline,
    positive_int,
    sampling_overrides,
    unit_float,
)
from imagen.utils.outputs import StagedOutput

if TYPE_CHECKING:
    from collections.abc import Iterator

    from PIL import Image

    from imagen.pipeline import ImagenPipeline, Progress


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``sample`` and ``upscale`` commands."""
    s = sub.add_parser("sample", help="generate images from prompts")
    s.add_argument("prompts", nargs="*", metavar="PROMPT", help="text prompt(s)")
    s.add_argument("--prompts-file", help="file with one prompt per line")
    s.add_argument("--negative-prompt", default="", help="what guidance steers away from")
    s.add_argument("--out", default="samples", help="output directory (default: samples)")
    add_sampling_options(s, per_stage=True)
    from imagen.cli.common import seed

    s.add_argument(
        "--seed", type=seed, default=0, help="seed of the first image (image j: seed + j)"
    )
    s.add_argument("--num-images", type=positive_int, default=1, help="images per prompt")
    s.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass")
    s.add_argument("--init-image", help="image-to-image / inpainting input")
    s.add_argument("--strength", type=unit_float, default=0.7, help="img2img strength in [0, 1]")
    s.add_argument("--mask", help="inpainting mask (white = regenerate)")
    s.add_argument("--save-stages", action="store_true", help="also save every stage's images")
    s.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    add_model_options(s)

    u = sub.add_parser("upscale", help="run images through the model's super-resolution stages")
    u.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s) to upscale")
    u.add_argument("--prompt", required=True, help="what the images show")
    u.add_argument("--negative-prompt", default="", help="what guidance steers away from")
    u.add_argument("--out", default="upscaled", help="output directory (default: upscaled)")
    u.add_argument("--steps", type=positive_int, help="sampling steps of every SR stage")
    u.add_argument("--guidance", type=finite_float, help="guidance scale of every SR stage")
    u.add_argument("--aug-level", type=finite_float, help="noise-augmentation level of the input")
    u.add_argument("--seed", type=seed, default=0, help="seed of the first image")
    u.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass")
    u.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    u.set_defaults(sampler=None, threshold=None)
    add_model_options(u)


OVERWRITE_HELP = "replace an earlier run in --out (its images, grid and manifest; nothing else)"


MAX_PROMPT_CHARS = 10_000  # a line longer than this is not a prompt (text encoders keep <= 512)


def _file_prompts(path: Path) -> Iterator[str]:
    """The non-empty lines of a prompts file, stripped (a UTF-8 BOM too), read lazily; a line
    over :data:`MAX_PROMPT_CHARS` is a UsageError (a file without newlines is never read whole)."""
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(iter(lambda: f.readline(MAX_PROMPT_CHARS + 1), ""), 1):
            if len(line) > MAX_PROMPT_CHARS and not line.endswith("\n"):
                raise UsageError(
                    f"prompts file {path}: line {n} is longer than {MAX_PROMPT_CHARS} characters"
                )
            if line.strip():
                yield line.strip()


def count_prompts(args: argparse.Namespace) -> int:
    """How many prompts the command line and ``--prompts-file`` give (the file is read once,
    streamed, so a UsageError for an unreadable or empty file comes before any work)."""
    count = sum(1 for p in args.prompts if p.strip())
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UsageError(f"prompts file not found: {path}")
        try:
            in_file = sum(1 for _ in _file_prompts(path))
        except UnicodeDecodeError:
            raise UsageError(f"prompts file is not UTF-8 text: {path}") from None
        if not in_file:
            raise UsageError(f"prompts file is empty: {path}")
        count += in_file
    if not count:
        raise UsageError("no prompt given (pass PROMPT ... or --prompts-file FILE)")
    return count


def iter_prompts(args: argparse.Namespace) -> Iterator[str]:
    """The prompts in order: the command line's, then the file's (read lazily)."""
    yield from (p for p in args.prompts if p.strip())
    if args.prompts_file:
        yield from _file_prompts(Path(args.prompts_file))


def read_prompts(args: argparse.Namespace) -> list[str]:
    """Every prompt, as a list (after the checks of :func:`count_prompts`)."""
    count_prompts(args)
    return list(iter_prompts(args))


def work_batches(args: argparse.Namespace) -> Iterator[tuple[list[str], list[int]]]:
    """(prompts, seeds) of each batch of ``--batch-size`` images: ``--num-images`` of each
    prompt, image j with seed ``--seed + j``; nothing beyond the current batch is held."""
    batch: tuple[list[str], list[int]] = ([], [])
    j = args.seed
    for prompt in iter_prompts(args):
        for _ in range(args.num_images):
            batch[0].append(prompt)
            batch[1].append(j)
            j += 1
            if len(batch[0]) == args.batch_size:
                yield batch
                batch = ([], [])
    if batch[0]:
        yield batch


def open_image(path: str | None, flag: str, mode: str = "RGB") -> Image.Image | None:
    """The image at ``path`` (None if no path), or a UsageError naming ``flag``."""
    if not path:
        return None
    from imagen.data.images import decode_user_image

    if not Path(path).is_file():
        raise UsageError(f"{flag} file not found: {path}")
    try:  # the header's size is checked before decoding: bombs and huge images are refused
        return decode_user_image(Path(path), f"{flag} {path}", mode)
    except ValueError as e:
        raise UsageError(str(e)) from None


class ProgressBars:
    """One tqdm bar per stage, counting image-steps; a stage's bar starts with its first step
    (its total is the images times the steps that stage runs, as the pipeline resolved them)."""

    def __init__(self, names: list[str], images: int) -> None:
        self.names, self.images = names, images
        self.bars: dict[int, Any] = {}

    def __call__(self, p: Progress) -> None:
        if p.stage not in self.bars:
            from tqdm import tqdm

            self.bars[p.stage] = tqdm(
                total=self.images * p.steps, desc=self.names[p.stage], unit="img-step", leave=True
            )
        self.bars[p.stage].update(p.batch_size)

    def close(self) -> None:
        for b in self.bars.values():
            b.close()


def progress_bars(pipe: ImagenPipeline, images: int, start: int = 0) -> ProgressBars:
    """The bars of a run of ``images`` images through the stages from ``start``."""
    stages = pipe.cascade.stages[start:]
    return ProgressBars(
        [f"stage {k} ({st.config.resolution}px)" for k, st in enumerate(stages, start)], images
    )


@command("sample")
def cmd_sample(args: argparse.Namespace) -> int:
    from imagen.cli.common import check_seeds

    total = count_prompts(args) * args.num_images
    check_seeds(args.seed, total)
    init = open_image(args.init_image, "--init-image")
    mask = open_image(args.mask, "--mask", "L")
    if mask and not init:
        raise UsageError("--mask needs --init-image")
    from imagen.pipeline import resolve_model
    from imagen.pipeline.outputs import RUN_FILES, RunWriter

    model = resolve_model(args.model)
    overrides = sampling_overrides(args)
    with StagedOutput(args.out, run_files=RUN_FILES, overwrite=args.overwrite) as staged:
        pipe = load_pipeline(args, model)
        edit = pipe.make_edit(init, args.strength, mask)
        bars = progress_bars(pipe, total)
        writer = RunWriter(staged, str(model), args.save_stages)
        try:
            for prompts, seeds in work_batches(args):
                out = pipe.generate(
                    prompts,
                    seeds,
                    overrides,
                    batch_size=args.batch_size,
                    return_all_stages=args.save_stages,
                    edit=edit,
                    progress=bars,
                    negative_prompts=[args.negative_prompt] * len(prompts),
                )
                writer.add(out)
        finally:
            bars.close()
            writer.close()
        writer.write_grid()
        target = staged.commit()
    print(f"wrote {writer.count} image(s), manifest.jsonl and grid.png to {target}")
    return 0


@command("upscale")
def cmd_upscale(args: argparse.Namespace) -> int:
    from imagen.cli.common import check_seeds

    if not args.prompt.strip():
        raise UsageError("--prompt is empty")
    check_seeds(args.seed, len(args.images))
    from imagen.data.images import check_user_image

    for path in args.images:  # every header now; each image is decoded when its batch runs
        if not Path(path).is_file():
            raise UsageError(f"IMAGE file not found: {path}")
        try:
            check_user_image(Path(path), f"IMAGE {path}")
        except ValueError as e:
            raise UsageError(str(e)) from None
    first = open_image(args.images[0], "IMAGE")
    assert first is not None
    from imagen.pipeline import resolve_model
    from imagen.pipeline.outputs import RUN_FILES, RunWriter

    model = resolve_model(args.model)
    overrides = sampling_overrides(args)
    with StagedOutput(args.out, run_files=RUN_FILES, overwrite=args.overwrite) as staged:
        pipe = load_pipeline(args, model)
        bars = progress_bars(pipe, len(args.images), pipe.upscale_start(max(first.size)))
        writer = RunWriter(staged, str(model))
        size = first.size
        try:
            for b in range(0, len(args.images), args.batch_size):
                paths = args.images[b : b + args.batch_size]
                out = pipe.upscale(
                    [open_image(p, "IMAGE") for p in paths],  # type: ignore[misc]
                    args.prompt,
                    overrides,
                    seed=args.seed + b,
                    batch_size=args.batch_size,
                    negative_prompt=args.negative_prompt,
                    progress=bars,
                )
                writer.add(out, sources=paths)
                size = out.images[0].size
        finally:
            bars.close()
            writer.close()
        target = staged.commit()
    print(f"upscaled {writer.count} image(s) to {size[0]} px in {target}")
    return 0
