"""A larger fuzz of ``imagen import`` than the tests run: random mutations of the tiny IF
pipelines of tests/if_tiny.py (a JSON field set to a hostile value or deleted, a whole config
replaced by garbage, 100,000 levels of nesting or 100 MB, a weights file truncated, its header
or data bytes changed, a file deleted, replaced by a symlink to /etc/passwd or a sibling, a
directory, a fifo or a dangling link), each seeded. The rule every mutant must keep: refused
with one line (exit status 2, no traceback, nothing written), or imported and then sampled
with one step. A mutant that takes over a minute counts as a hang.

    python benchmarks/import_fuzz.py [--mutants 300] [--seed 36] [--work DIR]

Writes benchmarks/results/import_fuzz-cpu-DATE.json: the outcome of every mutant and the
counts, by outcome and by kind of mutation.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import write  # noqa: E402
from if_tiny import make_if_pipelines  # noqa: E402
from import_mutations import copy_pipelines, judge, random_mutation  # noqa: E402

GOOD = ("refused", "imported and sampled")


def fuzz(src: Path, work: Path, mutants: int, seed: int) -> list[dict]:
    """Judge ``mutants`` seeded mutants of the pipelines in ``src``, one at a time."""
    rows = []
    for i in range(mutants):
        rng = random.Random(seed * 1_000_003 + i)
        folder = work / f"m{i}"
        base, sr = copy_pipelines(src, folder / "src")
        what = random_mutation(rng, base, sr)
        (folder / "work").mkdir()
        t0 = time.perf_counter()
        result = judge(base, sr, folder / "work")
        row = {"mutant": i, "mutation": what, "seconds": round(time.perf_counter() - t0, 3)}
        rows.append({**row, **result})
        mark = "ok  " if result["outcome"] in GOOD else "FAIL"
        print(f"{mark} {i:4d} {what[:70]:70s} {result['outcome']}", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mutants", type=int, default=300)
    p.add_argument("--seed", type=int, default=36)
    p.add_argument("--work", help="scratch directory (default: a temporary one)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="import-fuzz-"))
    os.environ.setdefault("IMAGEN_CACHE_DIR", str(work / "cache"))
    t0 = time.perf_counter()
    make_if_pipelines(work / "tiny")
    rows = fuzz(work / "tiny", work / "mutants", args.mutants, args.seed)
    took = time.perf_counter() - t0
    outcomes = Counter(r["outcome"] for r in rows)
    kinds = Counter(r["mutation"].split(" ")[0] for r in rows)
    failures = [r for r in rows if r["outcome"] not in GOOD]
    path = write(
        "import_fuzz-cpu",
        {
            "command": f"python benchmarks/import_fuzz.py --mutants {args.mutants} "
            f"--seed {args.seed}",
            "mutants": len(rows),
            "outcomes": dict(outcomes),
            "mutation_kinds": dict(kinds),
            "failures": len(failures),
            "tracebacks": outcomes.get("traceback", 0),
            "seconds": round(took, 1),
            "rows": rows,
        },
    )
    print(f"{len(rows)} mutants in {took:.0f} s: {dict(outcomes)}; {len(failures)} failures")
    print(f"wrote {path}")
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
