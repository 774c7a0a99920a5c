"""``imagen demo``: one command that shows what the project does, as a self-contained HTML report.

(a) a captioned grid from the bundled cascade for a dozen prompts, held-out combinations
included, scored by the Shapes checker; (b) with ``--train``, a small base model trained on
Shapes from scratch for a time budget, then sampled and scored the same way.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagen.cli.common import MODEL_HELP, command, positive_float, positive_int
from imagen.utils.outputs import check_output_dir

if TYPE_CHECKING:  # imported where used, so that `imagen --help` needs no torch
    from PIL import Image

    from imagen.pipeline import ImagenPipeline

DEMO_PROMPTS = [
    "a red circle on the left",
    "a blue square at the top",
    "a green triangle in the center",
    "a yellow circle at the bottom",
    "a white square on the right",
    "a purple circle in the center",
    "a red square above a blue circle",
    "a green circle left of a yellow square",
    "a white triangle below a red circle",
    "a blue triangle right of a green square",
    "a purple triangle on the left",  # held out: never seen in training
    "a purple triangle above a white circle",  # held out
]


def _png_data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _section(
    title: str,
    grid: Image.Image,
    images: list[Image.Image],
    prompts: list[str],
    info: dict[str, Any],
) -> str:
    from imagen.data.checker import check_image

    rows = []
    for img, p in zip(images, prompts, strict=True):
        v = check_image(img, p)
        mark = "&#10003;" if v.ok else "&#10007; " + html.escape(v.reason)
        rows.append(
            f"<tr><td><img src='{_png_data_uri(img)}' width=96></td><td>{html.escape(p)}</td>"
            f"<td>{mark}</td></tr>"
        )
    return (
        f"<h2>{html.escape(title)}</h2><img src='{_png_data_uri(grid)}' style='max-width:100%'>"
        f"<pre>{html.escape(json.dumps(info, indent=2))}</pre>"
        f"<table><tr><th>image</th><th>prompt</th><th>Shapes checker</th></tr>{''.join(rows)}</table>"
    )


def sample_section(
    pipe: ImagenPipeline, title: str, seed: int, extra: dict[str, Any]
) -> tuple[str, dict]:
    from imagen.data.checker import score
    from imagen.pipeline import sampling_summary
    from imagen.utils.grid import captioned_grid

    t0 = time.time()
    out = pipe(DEMO_PROMPTS, seed=seed)
    report = score(out.images, DEMO_PROMPTS)
    info = {
        **extra,
        "seconds": round(time.time() - t0, 1),
        "checker_accuracy": report["accuracy"],
        "settings": sampling_summary(out.sampling),
    }
    grid = captioned_grid(out.images, DEMO_PROMPTS, columns=6)
    return _section(title, grid, out.images, DEMO_PROMPTS, info), info


def run_demo(
    out_dir: str | Path, model: str | None = None, train_minutes: float | None = None, seed: int = 0
) -> Path:
    """Write ``OUT/demo.html`` (and the grids as PNG); returns the report's path."""
    from PIL import Image

    from imagen.pipeline import ImagenPipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    pipe = ImagenPipeline.from_pretrained(model)
    html_part, info = sample_section(
        pipe,
        f"The {'bundled' if model is None else model} cascade",
        seed,
        {"model": model or "bundled"},
    )
    sections.append(html_part)
    print(f"bundled cascade: checker accuracy {info['checker_accuracy']}")
    if train_minutes:
        from imagen.training.small_base import train_small_base

        model_dir, curves_path = train_small_base(out, train_minutes, seed)
        trained = ImagenPipeline.from_pretrained(model_dir)
        index = json.loads((model_dir / "model_index.json").read_text())
        html_part, info = sample_section(
            trained,
            f"A base model trained here for {train_minutes:g} minutes",
            seed,
            {"training": index["training"]},
        )
        sections.append(html_part)
        curves = Image.open(curves_path)
        sections.append(
            f"<h3>Its training curves</h3><img src='{_png_data_uri(curves)}' "
            "style='image-rendering:auto' alt='training loss and learning rate by step'>"
        )
        print(f"trained base model: checker accuracy {info['checker_accuracy']}")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>imagen demo</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem}"
        "td{padding:.2rem .6rem;vertical-align:middle}img{image-rendering:pixelated}</style></head><body>"
        "<h1>imagen demo</h1><p>Prompts in <i>purple triangle</i> combinations were held out of "
        "training: they test generalisation to unseen colour-shape pairs.</p>"
        + "".join(sections)
        + "</body></html>"
    )
    path = out / "demo.html"
    path.write_text(page, encoding="utf-8")
    return path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``demo`` command."""
    dm = sub.add_parser(
        "demo", help="samples from the bundled model (and a model trained here) as HTML"
    )
    dm.add_argument("--out", default="demo", help="output directory (default: demo)")
    dm.add_argument(
        "--model",
        help=MODEL_HELP,
    )
    dm.add_argument(
        "--train", action="store_true", help="also train a small base model from scratch"
    )
    dm.add_argument(
        "--minutes", type=positive_float, default=10.0, help="training time budget (default 10)"
    )
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--threads", type=positive_int)


@command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    check_output_dir(args.out)
    path = run_demo(args.out, args.model, args.minutes if args.train else None, args.seed)
    print(f"wrote {path}")
    return 0
