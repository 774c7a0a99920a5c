"""Subject tuning in one call (``imagen tune``): DreamBooth (Ruiz et al. 2023) with a LoRA.

A few images of a subject become a LoRA run of one stage of a model: each image is captioned
from the subject's token (``template``, ``"a {token}"`` by default: ``--token "sks dog"`` gives
"a sks dog"); with a class prompt, prior preservation mixes in images the model itself
generates for that prompt (made once, cached in the run, and reused while the prompt, model
and count are the same), the subject's images repeated to balance them one to one. The run
is an ordinary LoRA run (``train.lora``): it resumes, and ``imagen export RUN`` writes its
LoRA file. At the end the adapter is exported to ``RUN/lora`` and a sample grid
(``RUN/tune_samples.png``: the base model, then the tuned one, for the subject's prompt and
the class prompt) is drawn with the whole cascade; ``RUN/tune.json`` records the settings,
the wall time and the peak memory of the process.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from imagen.data.folders import IMAGE_EXTENSIONS
from imagen.models.cascade import Cascade, load_cascade
from imagen.models.lora import apply_loras
from imagen.models.lora_spec import LoraSpec
from imagen.models.model_dir import read_index, read_stage_config
from imagen.models.sampling import SamplingOverrides
from imagen.training.config import parse_cascade_config
from imagen.training.lora import train_stage
from imagen.training.lora_export import export_lora
from imagen.training.rundir import RunDirectory
from imagen.utils.files import write_json
from imagen.utils.grid import captioned_grid
from imagen.utils.pil import tensor_to_pil

# defaults per (network kind, super-resolution): LoRA rank, steps, learning rate, batch size
DEFAULTS: dict[tuple[str, bool], dict[str, Any]] = {
    ("diffusers-unet", False): {"rank": 4, "steps": 500, "lr": 1e-4, "batch_size": 4},  # IF-I
    ("diffusers-unet", True): {"rank": 4, "steps": 500, "lr": 5e-5, "batch_size": 2},  # IF-II
    # small U-Nets (the bundled Shapes base learns a subject in 60 steps: tune_shapes.py)
    ("imagen", False): {"rank": 8, "steps": 100, "lr": 2e-3, "batch_size": 8},
    ("imagen", True): {"rank": 8, "steps": 100, "lr": 1e-3, "batch_size": 4},
}
FALLBACK = {"rank": 4, "steps": 500, "lr": 1e-4, "batch_size": 4}
CLASS_DIR, INSTANCE_DIR = "class", "instance"
GRID_SEEDS = 4


@dataclass
class TuneOptions:
    """One subject tuning: the images, the token, the model and stage, and what to change
    of the stage's defaults (None: :data:`DEFAULTS`)."""

    images: Path
    token: str
    model: Path
    out: Path
    class_prompt: str | None = None
    num_class_images: int = 50  # with a class prompt: prior-preservation images
    template: str = "a {token}"
    stage: int = 0
    steps: int | None = None
    lr: float | None = None
    rank: int | None = None
    batch_size: int | None = None
    seed: int = 0
    device: str | None = None
    grid_steps: int | None = None  # sampling steps of the final grid (None: each stage's own)

    @property
    def prompt(self) -> str:
        return self.template.replace("{token}", self.token)


def _images(folder: Path) -> list[Path]:
    found = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not found:
        raise ValueError(f"{folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return found


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source.resolve(), target)
    except OSError:
        shutil.copyfile(source, target)


def settings(options: TuneOptions) -> dict[str, Any]:
    """The stage's defaults with the options' changes: rank, steps, lr, batch size."""
    index = read_index(options.model)
    if not 0 <= options.stage < len(index["stages"]):
        raise ValueError(
            f"--stage {options.stage}: {options.model} has {len(index['stages'])} stage(s)"
        )
    cfg = read_stage_config(options.model / index["stages"][options.stage])
    chosen = dict(DEFAULTS.get((cfg.network, cfg.is_super_resolution), FALLBACK))
    for key in ("rank", "steps", "lr", "batch_size"):
        if getattr(options, key) is not None:
            chosen[key] = getattr(options, key)
    return chosen


def class_images(options: TuneOptions, data: Path, full: Cascade) -> int:
    """Generate (or reuse) the prior-preservation images: the model's own images of the class
    prompt at the tuned stage's resolution, seeds 0..n-1; returns how many there are."""
    if not options.class_prompt or options.num_class_images < 1:
        return 0
    folder = data / CLASS_DIR
    want = {"prompt": options.class_prompt, "model": str(options.model), "stage": options.stage}
    want["count"] = options.num_class_images
    record = folder / "class.json"
    if record.is_file() and json.loads(record.read_text()) == want:
        return options.num_class_images
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cascade = full.first_stages(options.stage + 1)
    for start in range(0, options.num_class_images, 8):
        seeds = list(range(start, min(start + 8, options.num_class_images)))
        out = cascade.sample([options.class_prompt] * len(seeds), seeds=seeds)[-1]
        for j, image in zip(seeds, out.cpu(), strict=True):
            tensor_to_pil(image).save(folder / f"{j:04d}.png")
            (folder / f"{j:04d}.txt").write_text(options.class_prompt)
    write_json(record, want)
    return options.num_class_images


def prepare_data(options: TuneOptions, full: Cascade) -> dict[str, int]:
    """RUN/data: the subject's images (repeated to match the class images one to one) with
    their caption, and the class images of model ``full``; returns the counts."""
    images = _images(options.images)
    data = options.out / "data"
    n_class = class_images(options, data, full)
    instance = data / INSTANCE_DIR
    shutil.rmtree(instance, ignore_errors=True)
    instance.mkdir(parents=True)
    repeats = max(1, round(n_class / len(images)))
    for i, path in enumerate(images):
        for r in range(repeats):
            name = f"{i:03d}_{r:02d}"
            _link(path, instance / f"{name}{path.suffix.lower()}")
            (instance / f"{name}.txt").write_text(options.prompt)
    return {"instance_images": len(images), "repeats": repeats, "class_images": n_class}


def run_config(options: TuneOptions, chosen: dict[str, Any]) -> Any:
    """The LoRA run's config (a cascade config of one stage started from the model)."""
    steps = int(chosen["steps"])
    train = {
        "batch_size": chosen["batch_size"],
        "lr": chosen["lr"],
        "max_steps": steps,
        "warmup_steps": min(50, steps // 10),
        "checkpoint_every": max(1, min(steps, 250)),
        "sample_every": 0,
        "log_every": max(1, min(10, steps)),
        "seed": options.seed,
        "lora": {"rank": chosen["rank"]},
    }
    data = {"kind": "folder", "path": str(options.out / "data"), "random_crop": False}
    return parse_cascade_config(
        {"data": data, "stages": [{"init": f"{options.model}:{options.stage}", "train": train}]}
    )


def sample_grid(options: TuneOptions, lora: Path) -> Path:
    """The base model's and the tuned model's images of the subject's prompt (and the class
    prompt), seeds 0..3, with the whole cascade."""
    prompts = [options.prompt] + ([options.class_prompt] if options.class_prompt else [])
    texts = [p for p in prompts for _ in range(GRID_SEEDS)]
    seeds = list(range(GRID_SEEDS)) * len(prompts)
    rows, captions = [], []
    for tuned in (False, True):
        cascade = load_cascade(options.model, options.device or "cpu")
        if tuned:
            apply_loras(cascade, [LoraSpec(str(lora), 1.0, options.stage)])
        sampling = [st.config.sampling for st in cascade.stages]
        if options.grid_steps is not None:
            sampling = SamplingOverrides(steps=options.grid_steps).apply(sampling)
        out = cascade.sample(texts, sampling=sampling, seeds=seeds)[-1]
        rows += [tensor_to_pil(x) for x in out.cpu()]
        captions += [f"{'tuned' if tuned else 'base'}: {t}" for t in texts]
    path = options.out / "tune_samples.png"
    captioned_grid(rows, captions, columns=GRID_SEEDS, tile=96).save(path)
    return path


def peak_rss_mb() -> float:
    """The peak resident memory of this process so far, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1e3


def tune(options: TuneOptions, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run a subject tuning (see the module's docstring); returns its record (tune.json)."""
    if not options.token.strip():
        raise ValueError("the token is empty")
    before = RunDirectory(options.out).previous_run()
    if before and not resume:  # before any class image is made
        raise FileExistsError(
            f"{options.out} holds a previous run ({', '.join(before)}); pass --resume"
        )
    started = time.time()
    chosen = settings(options)
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    full = load_cascade(options.model, device)  # low-memory for large models (IF)
    counts = prepare_data(options, full)
    # the tuned stage's own encoder (IF: T5 as the low-memory cascade holds it)
    encoder = full.encoders.get(full.encoders.keys[options.stage])
    del full
    prepared = time.time()
    summary = train_stage(
        run_config(options, chosen),
        0,
        options.out,
        resume=resume,
        text_encoder=encoder,
        device=device,
        progress=progress,
    )
    trained = time.time()
    lora = export_lora(options.out, options.out / "lora")
    grid = sample_grid(options, lora)
    record = {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "prompt": options.prompt,
        "settings": chosen,
        "data": counts,
        "steps": summary["step"],
        "seconds": {
            "data": round(prepared - started, 2),
            "training": round(trained - prepared, 2),
            "export_and_grid": round(time.time() - trained, 2),
        },
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "threads": torch.get_num_threads(),
        "lora": str(lora),
        "grid": str(grid),
    }
    write_json(options.out / "tune.json", record)
    return record
