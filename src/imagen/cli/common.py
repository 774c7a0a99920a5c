"""What every ``imagen`` command shares: the command registry, :class:`UsageError`, the parser
class, argument types and the sampling options."""

from __future__ import annotations

import argparse
import gc
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from imagen.models.sampling import SamplingConfig
    from imagen.pipeline import ImagenPipeline, SamplingOverrides

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, Command] = {}
"""Every command's function by its name; each command module registers its own."""


MODEL_OVERWRITE_HELP = (
    "write over a directory that holds other files than a model's: an earlier model's own "
    "files (its index and stage files) are replaced, every other file is kept"
)


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


def command(name: str) -> Callable[[Command], Command]:
    """Register ``fn`` as the function of command ``name``."""

    def register(fn: Command) -> Command:
        COMMANDS[name] = fn
        return fn

    return register


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class ExclusiveBoolean(argparse.BooleanOptionalAction):
    """``--flag`` / ``--no-flag``; giving both is a usage error (argparse would let the last
    one win silently)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        seen = f"_given_{self.dest}"
        earlier = getattr(namespace, seen, None)
        if earlier is not None and earlier != option_string:
            parser.error(f"{earlier} and {option_string} exclude each other; give one")
        setattr(namespace, seen, option_string)
        super().__call__(parser, namespace, values, option_string)


# ---- argument types ----------------------------------------------------------------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def finite_float(text: str) -> float:
    """A finite number (no nan, no inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def unit_float(text: str) -> float:
    """A number in [0, 1]."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1


def seed(text: str) -> int:
    """A seed the torch generator takes: an integer in [0, 2**64 - 1]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer seed in [0, 2**64 - 1], got {text!r}"
        ) from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer seed in [0, 2**64 - 1], got {value}")
    return value


def check_seeds(first: int, count: int, flag: str = "--seed") -> None:
    """Raise a UsageError unless seeds ``first`` .. ``first + count - 1`` (one per image) all
    fit the generator."""
    if first + count - 1 > MAX_SEED:
        raise UsageError(
            f"{flag} {first}: {count} images need seeds up to {first + count - 1}, over the "
            f"generator's 2**64 - 1; use a smaller {flag}"
        )


def port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number up to 65535, got {value}")
    return value


def threshold(text: str) -> float | str:
    """A dynamic-thresholding percentile, or a thresholding mode (dynamic, static, none)."""
    if text in ("dynamic", "static", "none"):
        return text
    try:
        float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a percentile in (0, 1] or dynamic, static or none, got {text!r}"
        ) from None
    return finite_float(text)


def float_list(text: str) -> list[float]:
    """Comma-separated finite numbers."""
    try:
        return [finite_float(v) for v in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated finite numbers, got {text!r}"
        ) from None


def int_list(text: str) -> list[int]:
    """Comma-separated positive integers."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"step counts must be positive, got {text!r}")
    return values


def device(text: str) -> str:
    """A torch device that exists here: cpu, cuda, cuda:N, mps."""
    if text == "cpu":  # the default: no need to import torch to parse the command line
        return text
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r} (cpu, cuda, cuda:1, mps ...)"
        ) from None
    if dev.type == "cpu":
        return text
    backend = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None)}.get(dev.type)
    if backend is None:
        raise argparse.ArgumentTypeError(f"unsupported device {text!r} (cpu, cuda, cuda:1, mps)")
    if not backend.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no {dev.type} device is available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s)")
    return text


WEIGHT_DTYPE_NAMES = ("fp16", "fp32", "bf16", "int8")  # utils/tensors.py WEIGHT_DTYPES, torch-free

# ---- options shared by several commands --------------------------------------------------
MODEL_HELP = (
    "model directory, bundled model (shapes-cascade, shapes-cascade-fast) or Hugging Face Hub "
    "repo id (default: the bundled shapes-cascade)"
)


def add_model_options(p: argparse.ArgumentParser, default_device: str | None = "cpu") -> None:
    """--model, --device, --bf16 / --fp32 and --threads."""
    p.add_argument(
        "--model",
        help=MODEL_HELP,
    )
    p.add_argument(
        "--device",
        type=device,
        default=default_device,
        help=f"cpu, cuda, cuda:1, mps ... (default: {default_device or 'cuda if available'})",
    )
    precision = p.add_mutually_exclusive_group()
    precision.add_argument(
        "--bf16", action="store_true", help="run every U-Net under bf16 autocast"
    )
    precision.add_argument(
        "--fp32",
        action="store_true",
        help="run every U-Net in float32 (default: each stage's stored precision; bf16 runs "
        "only where the CPU or GPU supports it)",
    )
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch")
    add_lora_options(p)
    p.add_argument(
        "--low-memory",
        action=ExclusiveBoolean,
        default=None,
        help="hold one part of the cascade in memory at a time, weights in bf16 (default: for "
        "models over 2 GiB of weights, such as DeepFloyd IF)",
    )


def lora_spec(text: str) -> str:
    """A LoRA to apply, ``PATH[:SCALE][@STAGE]`` (checked without torch: the syntax and that
    PATH exists; the file itself is checked when it is applied)."""
    from imagen.models.lora_spec import LoraSpec

    try:
        spec = LoraSpec.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not Path(spec.path).expanduser().exists():
        raise argparse.ArgumentTypeError(f"LoRA file not found: {spec.path}")
    return text


def add_lora_options(p: argparse.ArgumentParser) -> None:
    """--lora (repeatable) and --fuse."""
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        type=lora_spec,
        metavar="PATH[:SCALE][@STAGE]",
        help="apply a LoRA: a pytorch_lora_weights.safetensors file (diffusers' or imagen "
        "export's) or its folder, at SCALE (default 1), to STAGE (default: the stage the file "
        "records, else 0, the stage DeepFloyd IF LoRAs are for); repeatable",
    )
    p.add_argument(
        "--fuse",
        action="store_true",
        help="merge the --lora adapters into the weights (faster; bf16 weights round the merge)",
    )


def sampler_name(name: str) -> str:
    """A sampler's name, checked without importing torch: the built-in ones, or, in a process
    that has imported the registry (and may have registered more), the registry's."""
    from imagen.diffusion.sampler_names import SAMPLER_HELP

    registry = sys.modules.get("imagen.diffusion.samplers")
    known = list(registry.SAMPLERS) if registry is not None else list(SAMPLER_HELP)
    if name not in known:
        raise argparse.ArgumentTypeError(
            f"unknown sampler {name!r}; choose one of {', '.join(known)}"
        )
    return name


def add_sampling_options(p: argparse.ArgumentParser, per_stage: bool = False) -> None:
    """The sampling overrides: --steps, --guidance, --sampler, --threshold, --aug-level (and,
    with ``per_stage``, --steps-per-stage and --guidance-per-stage)."""
    from imagen.diffusion.sampler_names import SAMPLER_HELP

    p.add_argument("--steps", type=positive_int, help="sampling steps for every stage")
    if per_stage:
        p.add_argument("--steps-per-stage", type=int_list, help="e.g. 20,20,10 (overrides --steps)")
    p.add_argument("--guidance", type=finite_float, help="guidance scale for every stage")
    if per_stage:
        p.add_argument(
            "--guidance-per-stage", type=float_list, help="e.g. 3,3,1 (overrides --guidance)"
        )
    p.add_argument(
        "--sampler",
        type=sampler_name,
        metavar="{" + ",".join(SAMPLER_HELP) + "}",
        help="sampler for every stage: " + "; ".join(f"{k}: {h}" for k, h in SAMPLER_HELP.items()),
    )
    p.add_argument(
        "--threshold",
        type=threshold,
        help="dynamic-thresholding percentile (e.g. 0.995), or static (clip to [-1, 1]) or none",
    )
    add_noise_options(p)
    p.add_argument(
        "--spacing",
        help="timestep spacing for every stage: trailing, leading (diffusers' DDPM default), or "
        "one of DeepFloyd IF's lists (fast27, smart27, smart50, smart100, smart185, super27, "
        "super40, super100; it sets the steps)",
    )


AUG_HELP = (
    "noise-augmentation level of super-resolution stages' low-res input, in [0, 1): the "
    "timestep round(A * 999) of the stage's schedule (diffusers' integer noise_level; IF "
    "stage II's default 250 is 0.25, the x4 upscaler's 100 is 0.1)"
)


def noise_level(text: str) -> int:
    """diffusers' integer noise level of a low-res input: 0 .. 999."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer 0..999, got {text!r}") from None
    if not 0 <= value <= 999:
        raise argparse.ArgumentTypeError(f"expected an integer 0..999, got {value}")
    return value


def add_noise_options(p: argparse.ArgumentParser) -> None:
    """--aug-level A, or --noise-level N (the same setting as diffusers' integer)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--aug-level", type=finite_float, help=AUG_HELP)
    group.add_argument(
        "--noise-level",
        type=noise_level,
        metavar="N",
        help="the same as --aug-level N/999: diffusers' noise_level (x4 upscaler: at most 350)",
    )


def aug_level(args: argparse.Namespace) -> float | None:
    """The augmentation level the command line gives (--aug-level, or --noise-level / 999)."""
    level = getattr(args, "noise_level", None)
    return level / 999 if level is not None else args.aug_level


def sampling_overrides(args: argparse.Namespace) -> SamplingOverrides:
    """The sampling overrides given on the command line (per-stage lists win)."""
    from imagen.pipeline import SamplingOverrides

    steps = getattr(args, "steps_per_stage", None)
    guidance = getattr(args, "guidance_per_stage", None)
    return SamplingOverrides(
        steps=steps if steps is not None else args.steps,
        guidance=guidance if guidance is not None else args.guidance,
        sampler=args.sampler,
        threshold=args.threshold,
        aug_level=aug_level(args),
        spacing=getattr(args, "spacing", None),
    )


def load_pipeline(args: argparse.Namespace, model: Path | None = None) -> ImagenPipeline:
    """The pipeline of ``model`` (default: --model) on --device (every stage in bf16 with
    --bf16, in float32 with --fp32, else at each stage's stored precision), with the --lora
    adapters (fused with --fuse)."""
    import torch

    from imagen.pipeline import ImagenPipeline

    dtype = None
    if getattr(args, "bf16", False):
        dtype = torch.bfloat16
    elif getattr(args, "fp32", False):
        dtype = torch.float32
    low_memory = getattr(args, "low_memory", None)
    lora = getattr(args, "lora", [])
    pipe = ImagenPipeline.from_pretrained(
        model or args.model,
        args.device or "cpu",
        dtype,
        low_memory=low_memory,
        lora=lora,
        fuse_lora=getattr(args, "fuse", False),
    )
    startup_done()
    return pipe


def startup_done() -> None:
    """The end of a command's start-up (its imports done, its model loaded): the objects made
    so far live until the process ends, so the garbage collector stops walking them
    (``gc.freeze``), and it runs again if :func:`imagen.cli.main.main` paused it for start-up.
    The libraries loaded by then (transformers, diffusers) log through the CLI's handler."""
    from imagen.cli.messages import adopt_library_loggers

    adopt_library_loggers()
    gc.freeze()
    gc.enable()


def checked_configs(pipe: ImagenPipeline, args: argparse.Namespace) -> list[SamplingConfig]:
    """Each stage's sampling settings with the command line's overrides, or a UsageError."""
    try:
        return pipe.sampling_configs(sampling_overrides(args))
    except ValueError as e:
        raise UsageError(str(e)) from None
