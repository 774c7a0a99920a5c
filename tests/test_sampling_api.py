"""The sampling interfaces shared by every front end: the sampler registry, the one progress
and cancel callback, the per-call overrides and the settings summary."""

import json
import math

import pytest
import torch
from test_cascade import PROMPTS, make_cascade

from imagen.diffusion.denoiser import Prediction
from imagen.diffusion.samplers import (
    SAMPLERS,
    Cancelled,
    Progress,
    Sampler,
    SamplerOption,
    get_sampler,
    sample_ddim,
)
from imagen.models.sampling import SamplingConfig
from imagen.models.stage import StageConfig
from imagen.pipeline import BUNDLED_MODEL, ImagenPipeline, SamplingOverrides, sampling_summary


def test_samplers_declare_their_options():
    assert get_sampler("ddim").options[0].name == "eta"
    assert SamplingConfig(sampler="ddim", eta=0.5).sampler_options() == {"eta": 0.5}
    assert SamplingConfig(sampler="ddpm").sampler_options() == {"variance": "posterior"}
    assert SamplingConfig(sampler="dpmpp").sampler_options() == {}
    with pytest.raises(ValueError, match="has no option"):
        get_sampler("dpmpp")(
            lambda x, t: Prediction(x), torch.zeros(2), [10], torch.ones(20), eta=1.0
        )


def test_existing_config_files_keep_their_sampler_fields():
    cfg = json.loads((BUNDLED_MODEL / "stage1" / "config.json").read_text())
    sampling = StageConfig.from_dict(cfg).sampling
    assert (sampling.eta, sampling.ddpm_variance) == (0.0, "posterior")


def test_the_ddim_eta_option_reaches_the_sampler():
    cascade = make_cascade()
    stage, text = cascade.stages[0], cascade.text_encoder.encode(PROMPTS)

    def run(eta):
        s = SamplingConfig(sampler="ddim", steps=4, eta=eta)
        return stage.sample(text, sampling=s, generator=torch.Generator().manual_seed(0))

    assert torch.equal(run(0.0), run(0.0)) and not torch.allclose(run(0.0), run(1.0))


def test_a_registered_sampler_is_offered_everywhere(monkeypatch):
    euler = Sampler(
        "euler",
        sample_ddim,
        "DDIM under another name",
        (SamplerOption("eta", "eta", 0.0, "noise", minimum=0.0),),
    )
    monkeypatch.setitem(SAMPLERS, "euler", euler)
    assert SamplingConfig(sampler="euler").sampler_options() == {"eta": 0.0}
    from imagen.cli.main import build_parser

    args = build_parser().parse_args(["sample", "x", "--sampler", "euler"])
    assert args.sampler == "euler"
    from imagen.server.schema import ServerConfig, request_model

    schema = request_model(ServerConfig(), SamplingConfig()).model_json_schema()
    assert "euler" in schema["properties"]["sampler"]["enum"]


def test_sampling_config_refuses_non_finite_values():
    for bad in ({"guidance": math.nan}, {"guidance": math.inf}, {"aug_level": math.nan}):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
    with pytest.raises(ValueError, match="eta"):
        SamplingConfig(eta=math.nan)
    with pytest.raises(ValueError, match="ddpm_variance"):
        SamplingConfig(ddpm_variance="wide")


def test_progress_reaches_every_step_of_every_stage():
    cascade = make_cascade()
    seen: list[Progress] = []
    cfgs = [SamplingConfig(steps=s) for s in (3, 2, 1)]
    cascade.sample(
        PROMPTS, sampling=cfgs, generator=torch.Generator().manual_seed(0), progress=seen.append
    )
    assert [(p.stage, p.step, p.steps) for p in seen] == [
        (0, 1, 3), (0, 2, 3), (0, 3, 3), (1, 1, 2), (1, 2, 2), (2, 1, 1)
    ]  # fmt: skip
    assert all(p.stages == 3 and p.batch_size == 2 for p in seen)
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)


def test_the_pipeline_reports_batches_and_returning_false_cancels():
    pipe = ImagenPipeline(make_cascade())
    seen: list[Progress] = []
    pipe(["a", "b", "c"], steps=1, batch_size=2, progress=seen.append)
    assert {(p.batch_start, p.batch_size, p.images_total) for p in seen} == {(0, 2, 3), (2, 1, 3)}
    assert seen[-1].fraction == pytest.approx(1.0)
    calls = []

    def stop_after_two(p):
        calls.append(p)
        return len(calls) < 2

    with pytest.raises(Cancelled):
        pipe(["a", "b", "c"], steps=3, batch_size=2, progress=stop_after_two)
    assert len(calls) == 2  # stopped at the step that said so


def test_threshold_override_takes_a_percentile_or_a_mode():
    pipe = ImagenPipeline(make_cascade())
    cfgs = pipe.sampling_configs(SamplingOverrides(threshold=["static", 0.9, "none"]))
    assert [c.threshold.mode for c in cfgs] == ["static", "dynamic", "none"]
    assert cfgs[1].threshold.percentile == 0.9
    assert [s["threshold"] for s in sampling_summary(cfgs)] == ["static", 0.9, "none"]
    back = pipe.sampling_configs(SamplingOverrides(threshold="dynamic"))  # the stored percentile
    assert {c.threshold.mode for c in back} == {"dynamic"}
    with pytest.raises(ValueError, match="threshold mode must be"):
        pipe.sampling_configs(SamplingOverrides(threshold="clip"))


def test_overrides_apply_per_stage_and_are_summarised_once():
    pipe = ImagenPipeline(make_cascade())
    o = SamplingOverrides(steps=[4, None, 2], guidance=2.0, sampler="ddim", threshold=0.9)
    cfgs = pipe.sampling_configs(o)
    default = pipe.cascade.stages[1].config.sampling.steps
    assert [c.steps for c in cfgs] == [4, default, 2] and {c.guidance for c in cfgs} == {2.0}
    assert {c.threshold.percentile for c in cfgs} == {0.9}
    assert hash(o) == hash(SamplingOverrides(**{**o.__dict__, "steps": (4, None, 2)}))
    summary = sampling_summary(cfgs)
    assert summary[0] == {
        "sampler": "ddim",
        "steps": 4,
        "guidance": 2.0,
        "threshold": 0.9,
        "aug_level": cfgs[0].aug_level,
        "precision": "fp32",
        "spacing": "trailing",
        "eta": 0.0,
    }
    with pytest.raises(ValueError, match="3 stages"):
        pipe.sampling_configs(SamplingOverrides(steps=[1, 2]))
    with pytest.raises(ValueError, match="guidance"):
        pipe.sampling_configs(SamplingOverrides(guidance=math.nan))
    out = pipe("a", steps=1, guidance=[2.0, 1.0, 1.0], overrides=o)  # explicit settings win
    assert [c.steps for c in out.sampling] == [1, 1, 1] and out.sampling[0].sampler == "ddim"


def test_each_stage_runs_at_its_stored_precision_unless_forced(tmp_path):
    from dataclasses import replace

    from imagen.utils.system import bf16_supported

    cascade = make_cascade()
    fp32 = ImagenPipeline(cascade)("a red circle", steps=2, seed=3).images[0]
    base = cascade.stages[0].config
    cascade.stages[0].config = replace(base, sampling=replace(base.sampling, precision="bf16"))
    stored = ImagenPipeline(cascade)("a red circle", steps=2, seed=3)
    forced = ImagenPipeline(cascade, torch.float32)("a red circle", steps=2, seed=3)
    assert stored.sampling[0].precision == "bf16" and forced.sampling[0].precision == "fp32"
    assert forced.images[0].tobytes() == fp32.tobytes()
    if bf16_supported(torch.device("cpu")):  # bf16 changes the images where it runs
        assert stored.images[0].tobytes() != fp32.tobytes()
    with pytest.raises(ValueError, match="precision"):
        SamplingConfig(precision="fp8")
