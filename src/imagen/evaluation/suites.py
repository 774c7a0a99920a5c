"""Prompt suites for prompt-following evaluations (``imagen eval clip``, ``imagen eval compare``).

Shipped with the package, unmodified, with their licences (``suite_data/NOTICE.md``):
PartiPrompts (1,632 prompts; a category and a challenge each; Apache-2.0) and GenEval (553
prompts; its task tag is the category; MIT). ``shapes`` is the bundled Shapes model's caption
set (its groups one, two and heldout are the categories). Any other suite is a user's file:
one prompt a line, or a TSV, CSV or JSONL file with a prompt column and a category column
(so a copy of DrawBench, which is not shipped, is ``--prompts drawbench.csv``).

Nothing here imports torch: the suite and category are checked before a model loads.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).with_name("suite_data")
UNCATEGORISED = "uncategorised"
MAX_PROMPT_CHARS = 10_000  # as imagen sample's prompts files
MAX_FILE_BYTES = 64 * 2**20
PROMPT_COLUMNS = ("prompt", "prompts", "text", "caption")
CATEGORY_COLUMNS = ("category", "tag")


@dataclass(frozen=True)
class SuitePrompt:
    """One prompt of a suite: its text, its category and (PartiPrompts) its challenge."""

    text: str
    category: str = UNCATEGORISED
    challenge: str | None = None


@dataclass(frozen=True)
class Suite:
    """A shipped suite: where its prompts come from and under which licence."""

    name: str
    file: str | None  # in suite_data/, None for one built from code
    count: int  # the published number of prompts
    description: str
    licence: str


SUITES = {
    s.name: s
    for s in (
        Suite(
            "parti",
            "PartiPrompts.tsv",
            1632,
            "PartiPrompts (Yu et al. 2022): 12 categories, 11 challenges",
            "Apache-2.0 (suite_data/LICENSE-PartiPrompts)",
        ),
        Suite(
            "geneval",
            "geneval_evaluation_metadata.jsonl",
            553,
            "GenEval (Ghosh et al. 2023): its 6 task tags as categories",
            "MIT (suite_data/LICENSE-GenEval)",
        ),
        Suite(
            "shapes",
            None,
            1170,
            "the bundled Shapes model's captions: groups one, two, heldout",
            "imagen's own",
        ),
    )
}


def load_suite(spec: str) -> list[SuitePrompt]:
    """The prompts of a shipped suite by name, or of a prompts file by path; a ValueError
    that lists the shipped suites for anything else."""
    if spec in SUITES:
        suite = SUITES[spec]
        if suite.file is None:
            return _shapes_prompts()
        return read_prompt_file(DATA / suite.file)
    path = Path(spec).expanduser()
    if path.is_file():
        return read_prompt_file(path)
    known = ", ".join(f"{s.name} ({s.count} prompts)" for s in SUITES.values())
    raise ValueError(
        f"unknown prompt suite {spec!r} (not a file either): choose {known}, or give a file "
        "(.txt: one prompt a line; .tsv, .csv or .jsonl: a prompt and a category column)"
    )


def _shapes_prompts() -> list[SuitePrompt]:
    from imagen.data.shapes import all_captions

    return [SuitePrompt(c, group) for group, caps in all_captions().items() for c in caps]


def read_prompt_file(path: str | Path) -> list[SuitePrompt]:
    """A prompts file by its suffix: ``.jsonl`` (objects with ``prompt`` and ``category`` or
    ``tag``), ``.tsv`` (a header row; tabs only, quotes are text, as PartiPrompts is written),
    ``.csv`` (a header row, quoted as spreadsheets write it), anything else one prompt a line.
    Blank prompts are skipped; a ValueError names the file and line of anything else wrong."""
    path = Path(path)
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"prompts file {path}: over {MAX_FILE_BYTES // 2**20} MiB")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"prompts file is not UTF-8 text: {path}") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _jsonl_rows(text, path)
    elif suffix in (".tsv", ".csv"):
        rows = _table_rows(text, path, suffix == ".tsv")
    else:
        rows = ((n, {"prompt": line}) for n, line in enumerate(text.splitlines(), 1))
    prompts = [p for p in (_prompt(row, n, path) for n, row in rows) if p is not None]
    if not prompts:
        raise ValueError(f"prompts file has no prompts: {path}")
    return prompts


def _jsonl_rows(text: str, path: Path) -> Iterable[tuple[int, dict]]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"prompts file {path}: line {n} is not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"prompts file {path}: line {n} is not a JSON object")
        yield n, {str(k).lower(): v for k, v in row.items()}


def _table_rows(text: str, path: Path, tsv: bool) -> Iterable[tuple[int, dict]]:
    reader = (
        csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
        if tsv
        else csv.reader(text.splitlines())
    )
    header = [h.strip().lower() for h in next(reader, [])]
    if not set(header) & set(PROMPT_COLUMNS):
        raise ValueError(
            f"prompts file {path}: its header row names no prompt column "
            f"({', '.join(PROMPT_COLUMNS)}); it has {', '.join(header) or 'none'}"
        )
    for n, cells in enumerate(reader, 2):
        if any(c.strip() for c in cells):
            yield n, dict(zip(header, cells, strict=False))


def _prompt(row: dict, n: int, path: Path) -> SuitePrompt | None:
    text = next((row[c] for c in PROMPT_COLUMNS if c in row), None)
    if text is None:
        raise ValueError(
            f"prompts file {path}: line {n} has no prompt ({', '.join(PROMPT_COLUMNS)})"
        )
    if not isinstance(text, str):
        raise ValueError(f"prompts file {path}: line {n}: the prompt is not text")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"prompts file {path}: line {n} is longer than {MAX_PROMPT_CHARS} characters"
        )
    if not text.strip():
        return None
    category = next((row[c] for c in CATEGORY_COLUMNS if row.get(c)), None)
    challenge = row.get("challenge")
    return SuitePrompt(
        text.strip(),
        str(category).strip() if category is not None else UNCATEGORISED,
        str(challenge).strip() if challenge else None,
    )


def categories(prompts: Sequence[SuitePrompt]) -> dict[str, int]:
    """Each category and its number of prompts, in the order they first appear."""
    return dict(Counter(p.category for p in prompts))


def select(
    prompts: Sequence[SuitePrompt],
    category: Sequence[str] | None = None,
    limit: int | None = None,
    suite: str = "the suite",
) -> list[SuitePrompt]:
    """The prompts of the named categories (any case; all when None), then at most ``limit``
    of them (:func:`spread`). An unknown category is a ValueError that lists the known ones."""
    known = categories(prompts)
    if category:
        by_lower = {k.lower(): k for k in known}
        missing = [c for c in category if c.lower() not in by_lower]
        if missing:
            listed = ", ".join(f"{k} ({v})" for k, v in known.items())
            raise ValueError(f"unknown category {missing[0]!r} in {suite}; known: {listed}")
        wanted = {by_lower[c.lower()] for c in category}
        prompts = [p for p in prompts if p.category in wanted]
    return spread(prompts, limit) if limit is not None else list(prompts)


def spread(prompts: Sequence[SuitePrompt], limit: int) -> list[SuitePrompt]:
    """``limit`` prompts, each category's share of them to within one (largest remainders),
    spread evenly through each category; in the suite's order. Deterministic: the same
    ``limit`` chooses the same prompts."""
    n = len(prompts)
    if limit >= n:
        return list(prompts)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p.category, []).append(i)
    exact = {c: limit * len(idx) / n for c, idx in groups.items()}
    quota = {c: int(q) for c, q in exact.items()}
    by_remainder = sorted(groups, key=lambda c: quota[c] - exact[c])  # largest remainder first
    for c in by_remainder[: limit - sum(quota.values())]:
        quota[c] += 1
    chosen = [idx[(j * len(idx)) // quota[c]] for c, idx in groups.items() for j in range(quota[c])]
    return [prompts[i] for i in sorted(chosen)]


def describe_suites() -> list[str]:
    """One line per shipped suite: name, count, what it is, licence."""
    return [f"{s.name}: {s.count} prompts, {s.description}; {s.licence}" for s in SUITES.values()]
