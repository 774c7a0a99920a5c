"""Paraphrased Shapes captions (imagen.data.wording): the grammar's parser reads every variant
to the meaning of its scene, the checker agrees on the rendered scene, held-out wording never
reaches training, and with paraphrasing off the dataset is today's."""

import hashlib
import itertools

import numpy as np
import pytest
import torch

from imagen.data.checker import caption_group, check_image
from imagen.data.shapes import (
    PALETTE,
    PLACES,
    RELATIONS,
    SHAPES,
    ParaphrasedShapes,
    ShapesConfig,
    ShapesDataset,
    all_captions,
    parse_caption,
    render_scene,
    scene_for_caption,
    shapes_dataset,
)
from imagen.data.wording import (
    ARTICLES,
    HELDOUT,
    HELDOUT_WORDS,
    LEXICONS,
    MORE,
    PUNCTUATION,
    SEEN,
    ParsedCaption,
    paraphrase,
    phrases,
    seen_words,
    words,
)
from imagen.evaluation.shapes import (
    GRAMMAR_GROUPS,
    GROUPS,
    eval_shapes,
    recorded_groups,
    shapes_prompts,
)

WORDINGS = (SEEN, MORE, HELDOUT)


def test_the_lexicon_names_the_grammar_words():
    for w in WORDINGS:
        assert set(w.colors) == set(PALETTE) and set(w.shapes) == set(SHAPES)
        assert set(w.places) == set(PLACES)
        assert set(w.relations) == set(w.relations_it) == set(RELATIONS)
    # the grammar's own words come first among the seen phrasings
    assert [SEEN.colors[c][0] for c in PALETTE] == list(PALETTE)
    assert [SEEN.places[p][0] for p in PLACES] == list(PLACES)


def test_every_held_out_phrasing_has_a_word_no_seen_phrasing_has():
    for lexicon in LEXICONS:
        assert HELDOUT_WORDS and not HELDOUT_WORDS & seen_words(lexicon)
    for phrase in phrases(HELDOUT):
        assert words(phrase) & HELDOUT_WORDS, phrase
    seen = {p.lower() for p in phrases(SEEN) + phrases(MORE)}
    assert not seen & {p.lower() for p in phrases(HELDOUT)}
    # the broad lexicon is the standard one and more: no phrasing twice, none dropped
    broad = phrases(LEXICONS["broad"])
    assert len(set(broad)) == len(broad) and set(phrases(SEEN)) < set(broad)


def one_object_variants(color, shape, place):
    """Every one-object phrasing: each template, place and prefix (with and without), every
    colour and shape phrasing and article in turn, each case and punctuation."""
    colors = [c for w in WORDINGS for c in w.colors[color]]
    shapes = [s for w in WORDINGS for s in w.shapes[shape]]
    templates = [t for w in WORDINGS for t in w.one_templates]
    places = [p for w in WORDINGS for p in w.places[place]]
    prefixes = ["", *(p for w in WORDINGS for p in w.prefixes)]
    for k, (t, p, pre) in enumerate(itertools.product(templates, places, prefixes)):
        if pre and not t.startswith("{obj}"):
            continue
        obj = f"{ARTICLES[k % 4]}{colors[k % len(colors)]} {shapes[k % len(shapes)]}"
        body = pre + t.format(obj=obj, place=p)
        yield (body, body.upper(), body.capitalize())[k % 3] + PUNCTUATION[k % 3]


def two_object_variants(a, relation, b):
    """Every two-object phrasing of "a RELATION b": each relation and clause template with
    each relation phrasing, both ways round (b INVERSE a), with and without prefixes."""
    inverse = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
    prefixes = ["", *(p for w in WORDINGS for p in w.prefixes)]
    k = 0
    for (x, rel, y), w in itertools.product(
        ((a, relation, b), (b, inverse[relation], a)), WORDINGS
    ):
        objs = {
            "a": f"{ARTICLES[k % 4]}{w.colors[x[0]][-1]} {w.shapes[x[1]][-1]}",
            "b": f"the {SEEN.colors[y[0]][k % 3]} {SEEN.shapes[y[1]][k % 3]}",
        }
        for pre, template in itertools.product(prefixes, (*w.two_templates, *w.clause_templates)):
            if pre and not template.startswith(("{a}", "{b}")):
                continue
            for phrase in (w.relations if "{rel}" in template else w.relations_it)[rel]:
                k += 1
                yield pre + template.format(**objs, rel=phrase, relit=phrase)


def test_the_parser_reads_every_variant_to_its_scene():
    for caption in all_captions()["one"][::7]:
        p = parse_caption(caption)
        for variant in one_object_variants(*p.objects[0], p.place):
            assert parse_caption(variant) == p, variant
    groups = all_captions()
    for caption in groups["two"][::97] + groups["heldout"][::41]:
        p = parse_caption(caption)
        if p.kind == "one":
            continue
        for variant in two_object_variants(p.objects[0], p.relation, p.objects[1]):
            assert parse_caption(variant).canonical() == p.canonical(), variant


def test_the_parser_refuses_what_no_wording_says():
    for text in ("a red circle", "a crimson ball to its right", "a red square and a blue"):
        with pytest.raises(ValueError, match="not a Shapes caption"):
            parse_caption(text)
    with pytest.raises(ValueError, match="two different colours"):
        parse_caption("a crimson ball and a scarlet box to its right")


@pytest.mark.parametrize(
    ("heldout", "lexicon"), [(False, "standard"), (True, "standard"), (False, "broad")]
)
def test_the_checker_agrees_with_the_parser_on_drawn_paraphrases(heldout, lexicon):
    # every drawn variant parses to its scene's meaning and the checker passes the scene's
    # render with it; the variant of the mirrored scene (relation or place swapped) fails it
    rng = np.random.default_rng(int(heldout))
    ds = ShapesDataset(32, ShapesConfig(seed=11, two_object_fraction=0.6))
    mirror = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
    places = {"on the left": "on the right", "at the top": "at the bottom"}
    places |= {v: k for k, v in places.items()}
    for i in range(150):
        scene = ds.scene(i)
        p = parse_caption(scene.caption)
        image = render_scene(scene, 32)
        for _ in range(4):
            variant = paraphrase(p, rng, heldout, lexicon)
            assert parse_caption(variant).canonical() == p.canonical(), variant
            assert check_image(image, variant).ok, variant
            groups = {"paraphrase_heldout"} if heldout else {"paraphrase", p.kind}
            assert caption_group(variant) in groups, variant
        if p.place in places or p.relation:
            wrong = ParsedCaption(
                p.objects, places.get(p.place), mirror.get(p.relation) if p.relation else None
            )
            assert not check_image(image, paraphrase(wrong, rng, heldout)).ok


@pytest.mark.parametrize("lexicon", ["standard", "broad"])
def test_held_out_wording_never_appears_in_training_captions(lexicon):
    config = ShapesConfig(seed=3, paraphrase=1.0, two_object_fraction=0.75, wording=lexicon)
    ds = shapes_dataset(32, config)
    assert isinstance(ds, ParaphrasedShapes) and not hasattr(ds, "captions")
    vocabulary = set(ds.vocabulary())
    seen_forms: set[str] = set()
    used: set[str] = set()
    for i in range(4000):
        caption = ds.scene(i).caption
        assert words(caption) <= vocabulary and not words(caption) & HELDOUT_WORDS, caption
        seen_forms.add(caption)
        used |= words(caption)
    assert len(seen_forms) > 3900  # varied: nearly every caption differs
    assert {"crimson", "navy", "ball", "right", "its", "beneath", "there's"} <= vocabulary
    assert not vocabulary & HELDOUT_WORDS
    assert used == vocabulary  # every word the vocabulary records is drawn
    added = {"ruby", "sphere", "cube", "cone", "painting", "along", "leftward", "centred"}
    assert (added <= vocabulary) == (lexicon == "broad")


def test_the_standard_lexicon_reproduces_v4_captions():
    # the first 400 captions of the v4.1 and v4 data configs (configs/shapes-v4*.yaml), as
    # drawn before the broad lexicon existed (commit 184e302): those configs still reproduce
    h = hashlib.sha256()
    for seed, paraphrased in ((5, 0.7), (4, 0.6)):
        ds = shapes_dataset(32, ShapesConfig(seed, 0.75, paraphrase=paraphrased))
        for i in range(400):
            h.update((ds.scene(i).caption + "\n").encode())
    assert h.hexdigest() == "12845fb2805cef16668ee6bdef51c543b1f1f488598b9bc2dfcc5277ffeee8ee"


def test_every_held_out_paraphrase_has_held_out_wording():
    rng = np.random.default_rng(5)
    for caption in all_captions()["one"][::3] + all_captions()["two"][::29]:
        for _ in range(5):
            assert words(paraphrase(parse_caption(caption), rng, True)) & HELDOUT_WORDS


def test_default_off_reproduces_todays_captions():
    # the first 400 captions of three configs, as the dataset drew them before paraphrasing
    # existed (src/imagen/data/shapes.py at commit 7aa8387)
    h = hashlib.sha256()
    for seed, fraction in ((0, 0.5), (1, 0.75), (7, 0.5)):
        ds = shapes_dataset(32, ShapesConfig(seed=seed, two_object_fraction=fraction))
        assert type(ds) is ShapesDataset
        for i in range(400):
            h.update((ds.scene(i).caption + "\n").encode())
    assert h.hexdigest() == "5e12946bab46c849013b5c9dcc14dbe8bd270428d1ff867cd476ebef22ec7ab7"


def test_paraphrased_items_are_the_same_scenes_and_images():
    plain = ShapesDataset(32, ShapesConfig(seed=9))
    varied = ParaphrasedShapes(32, ShapesConfig(seed=9, paraphrase=0.5))
    changed = 0
    indices = list(range(0, 600, 3))
    for i, (img, cap, _), (ref, ref_cap, _) in zip(
        indices, varied.__getitems__(indices), plain.__getitems__(indices), strict=True
    ):
        assert varied.scene(i).objects == plain.scene(i).objects and torch.equal(img, ref)
        assert parse_caption(cap).canonical() == parse_caption(ref_cap).canonical()
        changed += cap != ref_cap
    assert 0.4 < changed / len(indices) < 0.6


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half", True])
def test_the_paraphrase_fraction_is_checked(bad):
    with pytest.raises(ValueError, match="paraphrase"):
        ShapesConfig(paraphrase=bad)


def test_an_unknown_lexicon_is_named():
    with pytest.raises(ValueError, match="data.shapes.wording must be one of standard, broad"):
        ShapesConfig(paraphrase=0.5, wording="huge")


def test_eval_prompts_fill_every_group():
    prompts = shapes_prompts(12, seed=3)
    got = [caption_group(p) for p in prompts]
    assert got == [g for g in GROUPS for _ in range(12)]
    kinds = [parse_caption(p).kind for p in prompts[36:]]
    assert kinds == ["one", "two"] * 12
    assert shapes_prompts(12, seed=3) == prompts and shapes_prompts(12, seed=4) != prompts
    # a group's prompts do not depend on which other groups are asked for
    assert shapes_prompts(12, 3, ["paraphrase_heldout"]) == prompts[48:]
    assert shapes_prompts(12, 3, GRAMMAR_GROUPS) == prompts[:36]


def test_an_evaluation_recorded_before_the_paraphrase_groups_reruns_its_own_groups():
    assert recorded_groups({"num_per_group": 2, "seed": 0}) == GRAMMAR_GROUPS
    assert recorded_groups({"groups": ["one", "paraphrase"]}) == ("one", "paraphrase")
    with pytest.raises(ValueError, match="unknown Shapes groups"):
        eval_shapes(None, 1, groups=["three"])  # type: ignore[arg-type]


def test_a_paraphrase_scene_matches_its_caption():
    rng = np.random.default_rng(0)
    for caption in ("A crimson ball and, to its right, a navy box.", "on the left, a lime dot"):
        assert check_image(render_scene(scene_for_caption(caption, rng), 64), caption).ok


@pytest.mark.parametrize(
    ("typed", "meaning"),
    [
        ("a red circle and, to its right, a green square", "a green square right of a red circle"),
        ("A red circle and a green square to its right.", "a green square right of a red circle"),
        ("a blue square with a red circle above it", "a red circle above a blue square"),
        ("a white ball; below it, a lime box", "a green square below a white circle"),
        (
            "a navy box, together with a gold orb further left",
            "a yellow circle left of a blue square",
        ),
        ("navy box beneath a yellow triangle", "a blue square below a yellow triangle"),
        ("over the violet dot there is a scarlet wedge", "a red triangle above a purple circle"),
        ("There's a crimson ball to the right!", "a red circle on the right"),
        ("on the left, a red circle", "a red circle on the left"),
        ("An image of an emerald pyramid in the middle", "a green triangle in the center"),
        ("a painting of a ruby cone placed high up", "a red triangle at the top"),
        (
            "a jade cube plus a plum sphere more to the left",
            "a purple circle left of a green square",
        ),
        ("a sketch of a tile on the right-hand side", None),  # no colour: not a Shapes caption
    ],
)
def test_typed_captions_mean_what_they_say(typed, meaning):
    if meaning is None:
        with pytest.raises(ValueError):
            parse_caption(typed)
        return
    assert parse_caption(typed).canonical() == parse_caption(meaning).canonical()


def test_a_paraphrase_run_records_the_seen_words_as_its_vocabulary(tmp_path):
    import json

    from test_training import config

    from imagen.data.config import DataConfig
    from imagen.pipeline import ImagenPipeline
    from imagen.training.export import export_model
    from imagen.training.trainer import train_stage

    data = DataConfig(shapes=ShapesConfig(paraphrase=1.0, seed=1))
    train_stage(config(steps=2, data=data), 0, tmp_path / "run", progress=False)
    recorded = json.loads((tmp_path / "run" / "vocabulary.json").read_text())["vocabulary"]
    assert recorded == sorted(seen_words())
    export_model([tmp_path / "run"], tmp_path / "model")
    pipe = ImagenPipeline.from_pretrained(tmp_path / "model")
    assert pipe.check_words(["There's a crimson ball and, to its right, a navy box."]) == []
    (warning,) = pipe.check_words(["a rose orb on the left-hand side"])
    assert "rose, orb, hand" in warning


def test_paraphrased_captions_cannot_be_listed_ahead():
    from imagen.data.config import DataConfig
    from imagen.training.data import dataset_captions

    assert dataset_captions(DataConfig()) == ShapesDataset(8).captions()
    with pytest.raises(ValueError, match="paraphrase draws captions as it goes"):
        dataset_captions(DataConfig(shapes=ShapesConfig(paraphrase=0.5)))
