"""What a person reads (issue 39): warnings in the CLI's voice, above the progress bars and never
inside them, on a terminal (a pseudo-terminal here) and in a file; the manifest keeps them."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
import warnings
from pathlib import Path

import pytest

from imagen.cli import messages
from imagen.cli.messages import cli_messages, wrap

PROMPTS = ["a fluffy retriever in a beret", "a red circle on the left", "a blue dog at the top"]
"""With --batch-size 1: the first prompt's warning comes before any bar, the third's while all
three bars are on screen."""
UNKNOWN = {0: "fluffy, retriever, beret", 2: "dog"}
COLUMNS = 100


def sample_argv(out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "imagen",
        "sample",
        *PROMPTS,
        "--model",
        "shapes-cascade-fast",
        "--steps",
        "1",
        "--batch-size",
        "1",
        "--out",
        str(out),
    ]


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", COLUMNS=str(COLUMNS))
    env.pop("IMAGEN_LOG", None)
    return env


def screen(raw: str, columns: int) -> list[str]:
    """The final rendering of a terminal's lines: carriage returns, newlines, cursor-up
    (``ESC [ n A``) and wrapping at ``columns``; other escape sequences are dropped."""
    lines: list[list[str]] = [[]]
    row = col = 0
    for n, cmd, cr, nl, ch in re.findall(r"\x1b\[(\d*)([A-Za-z])|(\r)|(\n)|(.)", raw, re.S):
        if cmd == "A":
            row = max(0, row - int(n or 1))
        elif cmd:
            continue
        elif cr:
            col = 0
        elif nl or col >= columns:  # a newline, or a character past the last column
            row, col = row + 1, 0
            lines += [[] for _ in range(row + 1 - len(lines))]
        if ch:
            line = lines[row]
            line += [" "] * (col + 1 - len(line))
            line[col] = ch
            col += 1
    return ["".join(line).rstrip() for line in lines]


def run_in_terminal(argv: list[str], columns: int, timeout: float = 120) -> tuple[int, str]:
    """Run ``argv`` with stdin, stdout and stderr on a pseudo-terminal ``columns`` wide;
    returns its exit status and everything it wrote there."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    p = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=child_env())
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1.0)[0]:
                continue
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # the child closed the terminal (Linux: EIO)
                break
            if not chunk:
                break
            chunks.append(chunk)
        code = p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
    return code, b"".join(chunks).decode("utf-8", "replace")


def warning_blocks(lines: list[str]) -> list[tuple[int, str]]:
    """Each ``imagen: warning:`` line with its indented continuation lines, joined (and its
    first line's index)."""
    blocks = []
    for k, line in enumerate(lines):
        if line.startswith("imagen: warning:"):
            text, j = line, k + 1
            while j < len(lines) and lines[j].startswith(messages.INDENT):
                text, j = f"{text} {lines[j].strip()}", j + 1
            blocks.append((k, text))
    return blocks


BAR = re.compile(
    r"stage (\d) \((32|64|128)px\): 100%\|█+\| 3/3 \[\d\d:\d\d<\d\d:\d\d, .*img-step/s\]"
)


def test_on_a_terminal_warnings_are_lines_of_their_own_above_intact_bars(tmp_path):
    code, raw = run_in_terminal(sample_argv(tmp_path / "out"), COLUMNS)
    lines = [ln for ln in screen(raw, COLUMNS) if ln]
    assert code == 0, raw
    assert "WARNING" not in raw and "imagen.pipeline" not in raw  # the CLI's voice, not a logger's
    blocks = warning_blocks(lines)
    assert [
        text.split("never saw the word(s) ")[1].split(" in training")[0] for _, text in blocks
    ] == [
        UNKNOWN[0],
        UNKNOWN[2],
    ], lines
    assert all(text.endswith('(README: "DeepFloyd IF")') for _, text in blocks)
    assert all(len(ln) <= COLUMNS for ln in lines) and len(lines[blocks[0][0]]) > COLUMNS // 2
    bars = [k for k, ln in enumerate(lines) if BAR.fullmatch(ln)]
    assert [BAR.fullmatch(lines[k]).group(1) for k in bars] == ["0", "1", "2"], lines  # type: ignore[union-attr]
    assert max(k for k, _ in blocks) < bars[0]  # the mid-run warning went above the bars
    warned = {
        k for k, ln in enumerate(lines) if ln.startswith(("imagen: warning:", messages.INDENT))
    }
    rest = [ln for k, ln in enumerate(lines) if k not in warned and k not in bars]
    wrote = "".join(rest)  # stdout's one line (wrapped by the terminal: the path is long)
    assert wrote == f"wrote 3 image(s), manifest.jsonl and grid.png to {tmp_path / 'out'}", lines


def test_into_a_file_every_line_is_whole_and_the_manifest_keeps_the_warnings(tmp_path):
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        p = subprocess.run(
            sample_argv(tmp_path / "out"), stderr=f, stdout=subprocess.PIPE, env=child_env()
        )
    assert p.returncode == 0, err.read_text()
    text = err.read_text()
    assert "\r" not in text and "\x1b" not in text  # nothing drawn in place
    lines = text.splitlines()
    warned = [ln for ln in lines if ln.startswith("imagen: warning: this model never saw")]
    assert [UNKNOWN[0] in warned[0], UNKNOWN[2] in warned[1], len(warned)] == [True, True, 2]
    progress = [ln for ln in lines if ln not in warned]
    assert [
        re.fullmatch(r"stage (\d) \(\d+px\): 3/3 img-steps in [\d.]+ s", ln)[1] for ln in progress
    ] == [
        "0",
        "1",
        "2",
    ], lines
    rows = [json.loads(r) for r in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["warnings"] for r in rows] == [
        [f"unknown words: {UNKNOWN[0]}"],
        [],
        [f"unknown words: {UNKNOWN[2]}"],
    ]


def test_the_voice_levels_and_names(capsys, monkeypatch):
    log = logging.getLogger("imagen.test")
    monkeypatch.delenv("IMAGEN_LOG", raising=False)
    with cli_messages():
        log.info("not shown")
        log.warning("careful: %d", 3)
    with cli_messages(verbose=True):
        log.info("resumed")
    monkeypatch.setenv("IMAGEN_LOG", "debug")
    with cli_messages():
        log.debug("details")
    monkeypatch.setenv("IMAGEN_LOG", "error")
    with cli_messages():
        log.warning("hidden")
        log.error("shown")
    monkeypatch.setenv("IMAGEN_LOG", "loud")
    with cli_messages():
        pass
    assert capsys.readouterr().err.splitlines() == [
        "imagen: warning: careful: 3",
        "imagen: info: imagen.test: resumed",
        "imagen: debug: imagen.test: details",
        "imagen: error: shown",
        "imagen: warning: IMAGEN_LOG=loud: expected one of debug, info, warning, error; using "
        "the default",
    ]


def test_wrapping_keeps_long_words_whole_and_indents():
    text = "imagen: warning: " + "word " * 20 + "/a/very/long/path/" * 4
    lines = wrap(text, 40).splitlines()
    assert all(len(ln) < 40 for ln in lines[:-1]) and lines[-1] == "  " + "/a/very/long/path/" * 4
    assert all(ln.startswith("  ") for ln in lines[1:]) and wrap(text, None) == text


def test_python_warnings_go_through_the_handler_and_everything_is_put_back(capsys):
    root = logging.getLogger()
    handlers, level, show = list(root.handlers), root.level, warnings.showwarning
    with cli_messages(), warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn_explicit(
            "an odd value", UserWarning, "/venv/lib/site-packages/torch/nn/conv.py", 7
        )
    with cli_messages(verbose=True), warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn_explicit("again", FutureWarning, "/venv/lib/site-packages/diffusers/x.py", 9)
    assert capsys.readouterr().err.splitlines() == [
        "imagen: warning: an odd value (UserWarning from torch)",
        "imagen: warning: py.warnings: again (FutureWarning from diffusers) "
        "[/venv/lib/site-packages/diffusers/x.py:9]",
    ]
    assert (root.handlers, root.level, warnings.showwarning) == (handlers, level, show)


def test_a_warning_during_a_bar_is_written_above_it(capsys):
    from tqdm import tqdm

    with cli_messages():
        bar = tqdm(total=2, desc="stage 0 (32px)", unit="img-step", ncols=80)
        bar.update(1)
        logging.getLogger("imagen.test").warning("in the middle")
        bar.update(1)
        bar.close()
    lines = [ln for ln in screen(capsys.readouterr().err, 80) if ln]
    assert lines[0] == "imagen: warning: in the middle" and len(lines) == 2
    assert lines[1].startswith("stage 0 (32px): 100%|") and lines[1].endswith("img-step/s]")


def test_transformers_logs_through_the_handler(capsys, monkeypatch):
    tlog = pytest.importorskip("transformers.utils.logging")
    lib = logging.getLogger("transformers")
    tlog.get_logger("transformers.test").warning("from transformers")  # its own handler, first
    own = list(lib.handlers) or [logging.StreamHandler()]  # as transformers configures it
    monkeypatch.setattr(lib, "handlers", list(own))
    monkeypatch.setattr(lib, "propagate", False)
    with cli_messages():
        tlog.get_logger("transformers.test").warning("adopted")
    assert "imagen: warning: adopted" in capsys.readouterr().err.splitlines()
    assert lib.handlers == own and not lib.propagate  # as it was


def test_a_library_configured_after_it_was_adopted_is_restored_as_configured(monkeypatch):
    """A library may set its logger up between two adoptions (transformers does so lazily):
    what it set up is what the command leaves behind, not the bare logger first seen."""
    from imagen.cli import messages

    monkeypatch.setattr(messages, "LIBRARIES", ("imagen_test_lib",))
    lib = logging.getLogger("imagen_test_lib")
    monkeypatch.setattr(lib, "handlers", [])
    monkeypatch.setattr(lib, "propagate", True)
    with cli_messages():
        messages.adopt_library_loggers()  # the bare logger
        own = logging.StreamHandler()
        lib.addHandler(own)  # the library configures itself
        lib.propagate = False
        messages.adopt_library_loggers()
        assert lib.handlers == [] and lib.propagate
    assert lib.handlers == [own] and not lib.propagate


def test_each_image_has_its_own_prompts_unknown_words():
    from test_cascade import make_cascade

    from imagen.pipeline import ImagenPipeline

    pipe = ImagenPipeline(make_cascade(), vocabulary=["a", "red", "circle"])
    out = pipe(["a red circle", "a red dog", "a cat"], steps=1)
    assert out.image_warnings == [[], ["unknown words: dog"], ["unknown words: cat"]]
    assert len(out.warnings) == 1 and "dog, cat" in out.warnings[0]  # the call's, as before


def test_a_bf16_fallback_is_said_once_and_kept_with_every_image(monkeypatch, caplog):
    """--bf16 (dtype=torch.bfloat16) where bf16 is not fast runs in float32: said."""
    import torch
    from test_cascade import make_cascade

    from imagen.pipeline import ImagenPipeline

    monkeypatch.setattr("imagen.models.sampling.bf16_supported", lambda device: False)
    forced = ImagenPipeline(make_cascade(), torch.bfloat16)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            out = forced(["a", "b"], steps=1)
            assert out.image_warnings == [["ran in float32: cpu has no fast bf16"]] * 2
            assert out.warnings == []  # the server answers the prompts' warnings only
    assert caplog.text.count("bf16 was asked for") == 1


def test_low_memory_mode_chosen_by_size_is_said(monkeypatch, tmp_path, caplog):
    from test_cascade import make_cascade

    from imagen.pipeline import ImagenPipeline

    make_cascade().save(tmp_path / "m")
    monkeypatch.setattr("imagen.models.cascade.LOW_MEMORY_BYTES", 0)
    # bf16 weights computed in float32, as on a CPU without fast bf16 (the path that works for
    # the project's U-Nets: with fast bf16 they fail in layer_norm, a bug of its own)
    monkeypatch.setattr("imagen.models.cascade.bf16_supported", lambda device: False)
    with caplog.at_level(logging.WARNING):
        lean = ImagenPipeline.from_pretrained(tmp_path / "m")
    assert "runs in low-memory mode" in caplog.text
    assert lean(["a"], steps=1).image_warnings == [["low-memory mode: weights in bf16"]]
    assert ImagenPipeline.from_pretrained(tmp_path / "m", low_memory=True).notes == []
