"""Distillation on a tiny model: a guidance-distilled student matches its teacher's guided
output in one pass, a progressive student at N/2 steps is closer to its teacher at N steps
than the teacher itself at N/2 steps, and `imagen distill` resumes and writes a model."""

import json

import numpy as np
import pytest
import torch
import yaml

from imagen.cli.main import main
from imagen.data.shapes import ShapesDataset
from imagen.diffusion.guidance import Conditioning, guided_output, model_output
from imagen.models.model_dir import load_stage
from imagen.pipeline import ImagenPipeline
from imagen.text.encoders import HashTextEncoder
from imagen.training.export import export_model
from imagen.training.rundir import RunDirectory
from imagen.training.trainer import train_stage

TRAIN = dict(
    batch_size=8, lr=2e-3, warmup_steps=5, checkpoint_every=1000, sample_every=0, log_every=5
)
CONFIG = {
    "text_encoder": {"name": "hash-32", "max_length": 12},
    "data": {"kind": "shapes"},
    "stages": [
        {
            "preset": "tiny-base",
            "stage": {"diffusion": {"target": "v", "loss_weighting": "min_snr"}},
            "train": {**TRAIN, "max_steps": 150, "precision": "fp32"},
        }
    ],
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny base stage trained briefly (its outputs depend on the caption), as a model."""
    from imagen.training.config import parse_cascade_config

    root = tmp_path_factory.mktemp("teacher")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    train_stage(parse_cascade_config(CONFIG), 0, root / "run", progress=False)
    export_model([root / "run"], root / "model", dtype=torch.float32)
    return root


def distill(teacher, out, *extra):
    args = ["distill", str(teacher / "tiny.yaml"), "--stage", "0", "--teacher"]
    return main([*args, str(teacher / "model"), "--out", str(out), *extra])


def batch(n=24, seed=1):
    """Noisy Shapes images at random timesteps, with their captions encoded."""
    g = torch.Generator().manual_seed(seed)
    ds = ShapesDataset(16)
    items = [ds[10_000 + i] for i in range(n)]
    x0 = torch.stack([img for img, _, _ in items])
    text = HashTextEncoder(32, 12).encode([cap for _, cap, _ in items])
    t = torch.randint(100, 900, (n,), generator=g)
    return x0, Conditioning(text.tokens, text.mask), t, torch.randn(x0.shape, generator=g)


def test_guidance_distilled_student_matches_the_guided_teacher(teacher, tmp_path):
    assert distill(teacher, tmp_path / "g", "--max-steps", "200", "--lr", "1e-3") == 0
    t_stage = load_stage(teacher / "model" / "stage0")
    run = RunDirectory(tmp_path / "g")
    student = load_stage_from_run(run)
    x0, cond, t, noise = batch()
    xt = t_stage.schedule.q_sample(x0, t, noise)
    with torch.no_grad():
        for w in (3.0, 5.0):
            guided = guided_output(t_stage.unet, xt, t.float(), cond, w)
            conditional = model_output(t_stage.unet, xt, t.float(), cond)
            weight = torch.full((len(t),), w)
            got = model_output(
                student.unet, xt, t.float(), Conditioning(**{**cond.__dict__, "guidance": weight})
            )
            before = (conditional - guided).pow(2).mean()  # where the student started
            after = (got - guided).pow(2).mean()
            assert after < 0.5 * before, (w, float(after), float(before))


def load_stage_from_run(run):
    from imagen.models.stage import Stage
    from imagen.utils.tensors import load_strict, load_tensors

    stage = Stage(run.stage_config()).eval()
    ckpt = run.checkpoints()[-1]
    load_strict(stage.unet, load_tensors(ckpt / "ema.safetensors"), str(ckpt))
    return stage


def test_progressive_student_at_half_the_steps_is_closer_to_the_teacher(teacher, tmp_path):
    args = ["--mode", "progressive", "--teacher-steps", "4", "--guidance", "2"]
    model = tmp_path / "m"
    code = distill(
        teacher,
        tmp_path / "p",
        *args,
        "--max-steps",
        "300",
        "--lr",
        "1e-3",
        "--model-out",
        str(model),
    )
    assert code == 0
    index = json.loads((model / "model_index.json").read_text())
    sampling = json.loads((model / "stage0" / "config.json").read_text())["sampling"]
    assert (sampling["sampler"], sampling["steps"], sampling["guidance"]) == ("ddim", 2, 1.0)
    assert index["training"][0]["steps"] == 300
    prompts = ["a red circle on the left", "a blue square above a green triangle"] * 4
    ref = ImagenPipeline.from_pretrained(teacher / "model")

    def images(pipe, **kw):
        out = pipe(prompts, seed=3, return_all_stages=True, **kw)
        return torch.stack(
            [torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in out.images]
        )

    teacher_n = images(ref, steps=4, sampler="ddim", guidance=2.0)
    teacher_half = images(ref, steps=2, sampler="ddim", guidance=2.0)
    student_half = images(ImagenPipeline.from_pretrained(model))
    gap_student = (student_half - teacher_n).abs().mean()
    gap_teacher = (teacher_half - teacher_n).abs().mean()
    assert gap_student < 0.8 * gap_teacher, (float(gap_student), float(gap_teacher))


def test_distillation_resumes_exactly(teacher, tmp_path):
    common = ["--max-steps", "6", "--batch-size", "4"]
    assert distill(teacher, tmp_path / "straight", *common) == 0
    assert distill(teacher, tmp_path / "split", "--max-steps", "3", "--batch-size", "4") == 0
    assert distill(teacher, tmp_path / "split", *common, "--resume") == 0
    a = RunDirectory(tmp_path / "straight").checkpoints()[-1] / "ema.safetensors"
    b = RunDirectory(tmp_path / "split").checkpoints()[-1] / "ema.safetensors"
    assert a.read_bytes() == b.read_bytes()
    opts = RunDirectory(tmp_path / "split").read_options()
    assert (
        opts["distill"]["mode"] == "guidance"
        and opts["config"]["stages"][0]["stage"]["unet"]["guidance_cond"]
    )
