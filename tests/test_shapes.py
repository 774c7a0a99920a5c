import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from imagen.data.checker import (
    FAILURE_KINDS,
    STRICT_SQUARE_FILL,
    UNCLEAR,
    background_error,
    check_image,
    detect_objects,
    render_fidelity,
    score,
    shape_fidelity,
)
from imagen.data.shapes import (
    BACKGROUND,
    PALETTE,
    SUPERSAMPLE,
    Scene,
    ShapeObject,
    ShapesConfig,
    ShapesDataset,
    all_captions,
    draw_shape,
    parse_caption,
    render_scene,
    scene_for_caption,
)
from imagen.utils.pil import pil_to_tensor


def rendered(size, n=400, seed=1):
    ds = ShapesDataset(size, ShapesConfig(seed=seed))
    scenes = [ds.scene(i) for i in range(n)]
    return [render_scene(s, size) for s in scenes], [s.caption for s in scenes]


@pytest.mark.parametrize("size", [32, 64, 128])
def test_checker_accepts_ground_truth(size):
    # calibration of both shape decisions and of the fidelity on crisp renders, every resolution
    images, captions = rendered(size, 400 if size < 128 else 80)
    report = score(images, captions)
    for acc in (report["accuracy"], report["accuracy_strict"]):
        assert acc["one"] >= 0.99 and acc["two"] >= 0.99, acc
    fidelity = report["shape_fidelity"]
    assert fidelity["resolution"] == size and abs(fidelity["relative"] - 1) < 0.01, fidelity
    assert fidelity["generated"]["objects"] == sum(len(parse_caption(c).objects) for c in captions)


def test_checker_accepts_held_out_ground_truth():
    groups = all_captions()
    rng = np.random.default_rng(0)
    caps = [groups["heldout"][i] for i in rng.choice(len(groups["heldout"]), 100, replace=False)]
    images = [render_scene(scene_for_caption(c, rng), 32) for c in caps]
    assert score(images, caps)["accuracy"]["heldout"] >= 0.99


@pytest.mark.parametrize("size", [32, 64])
def test_checker_rejects_shuffled_captions(size):
    images, captions = rendered(size)
    random.Random(0).shuffle(captions)
    report = score(images, captions)
    assert report["accuracy"]["all"] <= 0.02
    assert {k for f in report["failures"].values() for k in f} <= set(FAILURE_KINDS)


def test_checker_is_robust_to_mild_noise():
    images, captions = rendered(64, 200)
    rng = np.random.default_rng(0)
    noisy = [
        Image.fromarray(
            np.clip(np.asarray(im) + rng.normal(0, 10, (64, 64, 3)), 0, 255).astype(np.uint8)
        )
        for im in images
    ]
    assert score(noisy, captions)["accuracy"]["all"] >= 0.97


def scene(*objs):
    return Scene("", tuple(ShapeObject(*o) for o in objs))


@pytest.mark.parametrize(
    ("objs", "caption", "reason"),
    [
        ([("red", "circle", 0.25, 0.5, 0.32)], "a red circle on the left", "ok"),
        ([("red", "circle", 0.25, 0.5, 0.32)], "a red square on the left", "wrong shape"),
        ([("red", "triangle", 0.25, 0.5, 0.32)], "a red circle on the left", "wrong shape"),
        ([("red", "square", 0.25, 0.5, 0.32)], "a red square on the right", "wrong place"),
        ([("red", "square", 0.5, 0.25, 0.32)], "a red square at the top", "ok"),
        ([("red", "circle", 0.25, 0.5, 0.32)], "a blue circle on the left", "missing blue"),
        (
            [("red", "circle", 0.25, 0.5, 0.3), ("green", "square", 0.75, 0.5, 0.3)],
            "a red circle on the left",
            "extra object",
        ),
        (
            [("red", "circle", 0.5, 0.25, 0.3), ("blue", "square", 0.5, 0.75, 0.3)],
            "a red circle above a blue square",
            "ok",
        ),
        (
            [("red", "circle", 0.5, 0.25, 0.3), ("blue", "square", 0.5, 0.75, 0.3)],
            "a red circle below a blue square",
            "wrong relation",
        ),
        (
            [("red", "circle", 0.5, 0.25, 0.3), ("blue", "square", 0.5, 0.75, 0.3)],
            "a blue square below a red circle",
            "ok",
        ),
        (
            [("red", "circle", 0.75, 0.5, 0.3), ("blue", "square", 0.25, 0.5, 0.3)],
            "a red circle right of a blue square",
            "ok",
        ),
        (
            [("red", "circle", 0.75, 0.5, 0.3), ("blue", "square", 0.25, 0.5, 0.3)],
            "a red circle left of a blue square",
            "wrong relation",
        ),
        (
            [("red", "circle", 0.25, 0.3, 0.25), ("red", "circle", 0.75, 0.7, 0.25)],
            "a red circle on the left",
            "2 red",
        ),
    ],
)
def test_checker_names_the_failure(objs, caption, reason):
    for size in (32, 128):
        v = check_image(render_scene(scene(*objs), size), caption)
        assert v.reason.startswith(reason), (size, v.reason)
        assert v.ok == (reason == "ok")


def test_render_follows_the_specification():
    img = np.asarray(render_scene(scene(("yellow", "square", 0.5, 0.5, 0.3)), 100))
    assert tuple(img[2, 2]) == BACKGROUND and tuple(img[50, 50]) == PALETTE["yellow"]
    # square of side 0.9 d = 27 px centred at 50: filled at 50 +- 12, background at 50 +- 15
    assert tuple(img[50, 62]) == PALETTE["yellow"] and tuple(img[50, 65]) == BACKGROUND
    tri = np.asarray(render_scene(scene(("white", "triangle", 0.5, 0.5, 0.4)), 100))
    row_top, row_bottom = (
        (tri[33] != BACKGROUND).any(-1).sum(),
        (tri[68] != BACKGROUND).any(-1).sum(),
    )
    assert row_top < 8 and row_bottom > 35  # apex up, base d = 40 px at the bottom
    edge = np.asarray(render_scene(scene(("white", "circle", 0.5, 0.5, 0.5)), 32)).astype(int)
    assert len({tuple(p) for p in edge.reshape(-1, 3)}) > 3  # anti-aliased: blended edge pixels


def reference_render(scene, size):
    """The specification: the whole canvas drawn at SUPERSAMPLE x, then box-filtered."""
    big = Image.new("RGB", (size * SUPERSAMPLE,) * 2, BACKGROUND)
    for obj in scene.objects:
        draw_shape(ImageDraw.Draw(big), obj, size * SUPERSAMPLE, PALETTE[obj.color])
    return big.resize((size, size), Image.BOX)


@pytest.mark.parametrize(("size", "n"), [(32, 600), (64, 300), (13, 300), (100, 60), (7, 200)])
def test_rendering_only_near_objects_gives_the_specified_pixels(size, n):
    # render_scene filters only the blocks around each object; it must equal filtering the
    # whole canvas, at any size (7 and 13 px clip objects at the border)
    ds = ShapesDataset(size, ShapesConfig(seed=size))
    for i in range(n):
        s = ds.scene(i)
        assert np.array_equal(
            np.asarray(render_scene(s, size)), np.asarray(reference_render(s, size))
        )


def test_batched_items_equal_single_items():
    ds = ShapesDataset(32, ShapesConfig(seed=2))
    indices = [5, 0, 977, 5, 123456789]
    batch = ds.__getitems__(indices)
    for i, (img, cap, notes) in zip(indices, batch, strict=True):
        single = ds[i]
        assert cap == single[1] == ds.scene(i).caption and notes == single[2] == ()
        assert torch.equal(img, single[0])
        assert torch.equal(img, pil_to_tensor(reference_render(ds.scene(i), 32)))


def test_scene_geometry_follows_the_grammar():
    ds = ShapesDataset(32, ShapesConfig(seed=3))
    kinds = []
    for i in range(3000):
        s = ds.scene(i)
        p = parse_caption(s.caption)
        kinds.append(p.kind)
        if p.kind == "one":
            (o,) = s.objects
            assert 0.28 <= o.d <= 0.36
        else:
            a, b = s.objects
            assert a.color != b.color and 0.28 <= a.d <= 0.37
            if p.relation == "above":
                assert abs(a.cy - 0.25) <= 0.05 + 1e-9 and abs(b.cy - 0.75) <= 0.05 + 1e-9
                assert abs(a.cx - 0.5) <= 0.1 + 1e-9
            if p.relation == "right of":
                assert a.cx > b.cx
        for o in s.objects:
            assert (o.color, o.shape) != ("purple", "triangle")  # held out by default
            assert o.d / 2 <= o.cx <= 1 - o.d / 2 and o.d / 2 <= o.cy <= 1 - o.d / 2
    assert 0.45 < kinds.count("one") / len(kinds) < 0.55


def test_deterministic_for_seed_and_index():
    a, b = ShapesDataset(32, ShapesConfig(seed=5)), ShapesDataset(32, ShapesConfig(seed=5))
    assert a.scene(17) == b.scene(17) and a.scene(17) != a.scene(18)
    assert ShapesDataset(32, ShapesConfig(seed=6)).scene(17) != a.scene(17)
    img, cap, notes = a[17]
    assert img.shape == (3, 32, 32) and img.min() >= -1 and img.max() <= 1 and notes == ()
    big = ShapesDataset(64, ShapesConfig(seed=5))[17]  # the same scene at every resolution
    assert big[1] == cap


def test_custom_holdout_and_caption_groups():
    cfg = ShapesConfig(holdout=[["red", "circle"], ["blue", "square"]])
    ds = ShapesDataset(32, cfg)
    for i in range(500):
        assert not {(o.color, o.shape) for o in ds.scene(i).objects} & {
            ("red", "circle"),
            ("blue", "square"),
        }
    groups = all_captions()
    assert len(groups["one"]) == 85 and all("purple triangle" in c for c in groups["heldout"])
    with pytest.raises(ValueError, match="not a Shapes caption"):
        parse_caption("a cat")


def rounded_square(size, radius, color="yellow", blur=0.0):
    """A square of side 0.3 of the image at its centre, corners rounded to ``radius`` of the
    side, drawn like the dataset (supersampled, box-filtered), optionally blurred."""
    from PIL import ImageFilter

    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    side = 0.3 * big
    box = [big / 2 - side / 2, big / 2 - side / 2, big / 2 + side / 2, big / 2 + side / 2]
    ImageDraw.Draw(img).rounded_rectangle(box, radius * side, fill=PALETTE[color])
    img = img.resize((size, size), Image.BOX)
    return img.filter(ImageFilter.GaussianBlur(blur)) if blur else img


@pytest.mark.parametrize("size", [32, 64, 128])
def test_the_strict_decision_and_the_fidelity_see_rounded_corners(size):
    caption = "a yellow square in the center"
    # corners rounded enough to fill 0.90-0.93 of the box on each pixel grid: still nearest
    # the square template, but neither a square nor a circle to the strict decision
    crisp, rounded = rounded_square(size, 0.0), rounded_square(size, 0.29 if size > 64 else 0.27)
    for strict in (False, True):
        assert check_image(crisp, caption, strict=strict).ok
    assert check_image(rounded, caption).ok
    v = check_image(rounded, caption, strict=True)
    assert not v.ok and v.kind == "wrong shape" and v.objects[0].shape == UNCLEAR, v.reason
    assert v.objects[0].shape_scores["square"] < STRICT_SQUARE_FILL
    circle = render_scene(scene(("yellow", "circle", 0.5, 0.5, 0.3)), size)
    assert check_image(circle, "a yellow circle in the center", strict=True).ok
    ((shape, crisp_f),) = shape_fidelity(crisp, caption)
    ((_, rounded_f),) = shape_fidelity(rounded, caption)
    ((_, soft_f),) = shape_fidelity(rounded_square(size, 0.15, blur=size / 32), caption)
    assert shape == "square" and crisp_f > 0.99 and rounded_f < crisp_f - 0.05, (crisp_f, rounded_f)
    assert soft_f < crisp_f - 0.01, soft_f
    assert score([crisp, rounded], [caption] * 2)["accuracy_strict"]["all"] == 0.5


def test_render_fidelity_is_the_crisp_reference_and_rises_with_resolution():
    caps = [c for g in all_captions().values() for c in g[:10]]
    low, high = render_fidelity(caps, 32), render_fidelity(caps, 128)
    assert 0.85 < low["mean"] < high["mean"] <= 1.0 and high["mean"] > 0.97
    assert high["by_shape"]["square"] > 0.99 and set(low["by_shape"]) == {
        "circle",
        "square",
        "triangle",
    }


def test_detect_objects_on_a_blank_image():
    assert detect_objects(Image.new("RGB", (32, 32), BACKGROUND)) == []


def test_background_error_measures_a_tint_and_ignores_the_objects():
    images, captions = rendered(64, 20)
    assert score(images, captions)["background_error"] == 0.0
    tinted = [np.clip(np.asarray(im).astype(int) + (4, 12, 8), 0, 255) for im in images]
    errors = [background_error(t.astype(np.uint8)) for t in tinted]
    assert all(abs(e - 8.0) < 1e-4 for e in errors)  # the mean of the tint, edges excluded
    blank = Image.new("RGB", (32, 32), tuple(c + 6 for c in BACKGROUND))
    assert background_error(blank) == 6.0
