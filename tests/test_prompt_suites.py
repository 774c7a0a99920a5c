"""Prompt suites (issue 35): the shipped PartiPrompts and GenEval files with their published
counts, categories and licence notices; users' prompt files; --category and --limit; and the
command line's suite errors, all without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from imagen.evaluation.suites import (
    DATA,
    SUITES,
    UNCATEGORISED,
    categories,
    load_suite,
    read_prompt_file,
    select,
)

PARTI_CATEGORIES = {
    "Abstract": 51,
    "Animals": 314,
    "Artifacts": 287,
    "Arts": 66,
    "Food & Beverage": 74,
    "Illustrations": 124,
    "Indoor Scenes": 40,
    "Outdoor Scenes": 131,
    "People": 177,
    "Produce & Plants": 50,
    "Vehicles": 104,
    "World Knowledge": 214,
}
GENEVAL_TAGS = {
    "single_object": 80,
    "two_object": 99,
    "counting": 80,
    "colors": 94,
    "position": 100,
    "color_attr": 100,
}


def test_the_shipped_suites_have_their_published_counts_and_categories():
    parti, geneval = load_suite("parti"), load_suite("geneval")
    assert len(parti) == SUITES["parti"].count == 1632
    assert len(geneval) == SUITES["geneval"].count == 553
    assert categories(parti) == PARTI_CATEGORIES  # 12 categories
    assert categories(geneval) == GENEVAL_TAGS  # GenEval's tag is the category
    assert len({p.challenge for p in parti}) == 11 and None not in {p.challenge for p in parti}
    assert len({p.text for p in parti}) == 1632
    assert len(load_suite("shapes")) == SUITES["shapes"].count
    # PartiPrompts is tab-separated without quoting: a prompt's own quotes are its text
    assert any(p.text.startswith('"G I G G L E" painted') for p in parti)
    assert parti[0].text == "bond" and parti[0].category == "Abstract"
    assert geneval[0].text == "a photo of a bench" and geneval[0].category == "single_object"


def test_the_suites_ship_with_their_licence_notices_as_package_data():
    assert "Apache License" in (DATA / "LICENSE-PartiPrompts").read_text()
    assert "MIT License" in (DATA / "LICENSE-GenEval").read_text()
    assert "Dhruba Ghosh" in (DATA / "LICENSE-GenEval").read_text()
    notice = (DATA / "NOTICE.md").read_text()
    for name in ("PartiPrompts.tsv", "geneval_evaluation_metadata.jsonl", "google-research/parti"):
        assert name in notice
    assert "DrawBench" in notice and not list(DATA.glob("*rawbench*"))
    root = Path(__file__).resolve().parents[1]
    pyproject = (root / "pyproject.toml").read_text()
    assert '"evaluation/suite_data/*"' in pyproject  # installed with the package


def test_prompt_files_of_every_kind(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("\ufeffa red circle\n\n  a blue square  \n")
    assert [(p.text, p.category) for p in read_prompt_file(txt)] == [
        ("a red circle", UNCATEGORISED),
        ("a blue square", UNCATEGORISED),
    ]
    tsv = tmp_path / "p.tsv"
    tsv.write_text('Prompt\tCategory\n"quoted" text\tA\nplain\t\n')
    assert [(p.text, p.category) for p in read_prompt_file(tsv)] == [
        ('"quoted" text', "A"),
        ("plain", UNCATEGORISED),
    ]
    csv = tmp_path / "drawbench.csv"  # DrawBench's own columns, spreadsheet quoting
    csv.write_text('Prompts,Category\n"A red colored car, by a tree.",Colors\nA dog.,Counting\n')
    assert [(p.text, p.category) for p in read_prompt_file(csv)] == [
        ("A red colored car, by a tree.", "Colors"),
        ("A dog.", "Counting"),
    ]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a cat", "tag": "animals"}) + "\n\n")
    assert [(p.text, p.category) for p in read_prompt_file(jsonl)] == [("a cat", "animals")]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.tsv", "Caption-less\tCategory\nx\ty\n", "no prompt column"),
        ("bad.jsonl", '{"prompt": "ok"}\nnot json\n', "line 2 is not JSON"),
        ("bad.jsonl", '{"category": "x"}\n', "line 1 has no prompt"),
        ("empty.txt", "\n  \n", "has no prompts"),
    ],
)
def test_bad_prompt_files_are_one_line_errors(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        read_prompt_file(tmp_path / name)


def test_category_and_limit_choose_prompts():
    parti = load_suite("parti")
    animals = select(parti, ["animals", "Vehicles"])  # any case, repeatable
    assert categories(animals) == {"Animals": 314, "Vehicles": 104}
    for suite in ("parti", "geneval"):
        prompts = load_suite(suite)
        full = categories(prompts)
        for limit in (37, 100):
            chosen = select(prompts, limit=limit)
            assert len(chosen) == limit and len(set(chosen)) == limit
            got = categories(chosen)
            for c, n in full.items():  # each category's share to within one prompt
                assert abs(got.get(c, 0) - limit * n / len(prompts)) < 1, (suite, c)
            assert [prompts.index(p) for p in chosen] == sorted(prompts.index(p) for p in chosen)
            assert select(prompts, limit=limit) == chosen  # deterministic
    assert select(parti, ["Indoor Scenes"], limit=1000) == select(parti, ["Indoor Scenes"])


def test_unknown_suites_and_categories_list_the_known_ones():
    with pytest.raises(ValueError, match=r"parti \(1632 prompts\), geneval \(553 prompts\)"):
        load_suite("partiprompts")
    with pytest.raises(ValueError, match=r"unknown category 'Robots'.*Animals \(314\)"):
        select(load_suite("parti"), ["Robots"], suite="parti")


CLI_WITHOUT_TORCH = """
import contextlib, io, json, sys
from imagen.cli.main import main
runs = {
    "clip help": ["eval", "clip", "--help"],
    "compare help": ["eval", "compare", "--help"],
    "bad suite": ["eval", "clip", "--prompts", "nope"],
    "bad category": ["eval", "compare", "--prompts", "geneval", "--category", "robots"],
    "bad settings": ["eval", "compare", "--prompts", "parti", "--a", "--steps x"],
    "unknown option": ["eval", "compare", "--prompts", "parti", "--b", "--stepz 3"],
    "no suite": ["eval", "clip"],
    "images and steps": ["eval", "clip", "--images", "samples", "--steps", "4"],
    "list": ["eval", "prompts"],
    "prompts": ["eval", "prompts", "geneval", "--limit", "6"],
}
out = {}
for name, argv in runs.items():
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        code = main(argv)
    out[name] = [code, o.getvalue(), e.getvalue()]
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers"})
print(json.dumps({"runs": out, "heavy": heavy}))
"""


def test_eval_clip_and_compare_usage_errors_are_one_line_without_torch():
    p = subprocess.run(
        [sys.executable, "-c", CLI_WITHOUT_TORCH], capture_output=True, text=True, check=True
    )
    out = json.loads(p.stdout)
    assert out["heavy"] == []
    runs = out["runs"]
    assert runs["clip help"][0] == runs["compare help"][0] == 0
    errors = ("bad suite", "bad category", "bad settings", "unknown option", "no suite")
    for name in (*errors, "images and steps"):
        code, _, err = runs[name]
        assert code == 2 and len(err.strip().splitlines()) == 1, (name, err)
        assert "Traceback" not in err
    assert "choose parti (1632 prompts), geneval (553 prompts)" in runs["bad suite"][2]
    assert "known: single_object (80), two_object (99)" in runs["bad category"][2]
    assert "argument --a: argument --steps: expected a positive integer" in runs["bad settings"][2]
    assert "--stepz" in runs["unknown option"][2]
    assert "drop --steps" in runs["images and steps"][2]
    assert runs["list"][1].startswith("parti: 1632 prompts")
    assert len(runs["prompts"][1].splitlines()) == 6
