"""LoRA (issue 34) on tiny random DeepFloyd IF pipelines built here: a LoRA trained here
loads into diffusers' IFPipeline and gives diffusers the images it gives here; a LoRA made
with PEFT in diffusers' layout loads here and gives diffusers' images; a diffusers-format
export loads with DiffusionPipeline.from_pretrained and matches `imagen sample`; LoRA
training lowers the loss, resumes bit-exactly and checkpoints only the adapter; bad LoRA files
are one-line errors, and a pickle is never unpickled. All compared in float32 (IF stages
store bf16 sampling precision, which autocasts on CPUs with fast bf16)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("sentencepiece")

from if_tiny import BASE_SIZE, CORPUS, make_if_pipelines  # noqa: E402

from imagen.cli.main import main  # noqa: E402

PROMPT = "a red cat on a blue sofa"
STEPS = 10  # DDPM steps of the comparisons (leading spacing, as diffusers)


def _pixels(image: torch.Tensor) -> np.ndarray:
    return ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy().astype(int)


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fixed_small(pipe):
    """diffusers' IF pipeline as its README has LoRA users set it: the fixed variance."""
    from diffusers import DDPMScheduler

    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, variance_type="fixed_small")
    return pipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny IF pipelines, their imported model and a captioned image folder."""
    root = tmp_path_factory.mktemp("lora")
    base, sr = make_if_pipelines(root)
    assert main(["import", str(base), str(sr), "--out", str(root / "model")]) == 0
    folder = root / "data"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        colour = rng.integers(0, 256, 3, dtype=np.uint8)
        pixels = np.broadcast_to(colour, (BASE_SIZE, BASE_SIZE, 3)).copy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(CORPUS[i % len(CORPUS)])
    return {"root": root, "base": base, "sr": sr, "model": root / "model", "data": folder}


def _train(tiny, out, lora=True, steps=8, **kwargs):
    from imagen.models.cascade import load_cascade
    from imagen.training.config import parse_cascade_config
    from imagen.training.lora import train_stage

    train = dict(batch_size=4, lr=1e-2, warmup_steps=1, checkpoint_every=4, sample_every=0)
    train.update(max_steps=steps, log_every=1)
    if lora:
        train["lora"] = {"rank": 4, "alpha": 8}
    data = {"kind": "folder", "path": str(tiny["data"])}
    cfg = parse_cascade_config(
        {"data": data, "stages": [{"init": f"{tiny['model']}:0", "train": train}]}
    )
    encoder = tiny.setdefault("encoder", load_cascade(tiny["model"]).text_encoder)
    return train_stage(cfg, 0, out, text_encoder=encoder, progress=False, **kwargs)


@pytest.fixture(scope="module")
def lora_run(tiny):
    run = tiny["root"] / "lora-run"
    _train(tiny, run)
    return run


def test_lora_training_lowers_the_loss_resumes_exactly_and_keeps_only_the_adapter(tiny, lora_run):
    from imagen.training.rundir import RunDirectory
    from imagen.utils.tensors import load_tensors

    split = tiny["root"] / "lora-split"
    _train(tiny, split, max_steps=4)
    _train(tiny, split, resume=True)
    losses = [json.loads(x)["loss"] for x in (lora_run / "log.jsonl").read_text().splitlines()]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    ckpts = [RunDirectory(r).checkpoints()[-1] for r in (lora_run, split)]
    for name in ("model", "ema"):
        a, b = (load_tensors(c / f"{name}.safetensors") for c in ckpts)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert all(".lora_A." in k or ".lora_B." in k for k in a)  # the adapter alone
    base_bytes = (tiny["model"] / "stage0" / "model.safetensors").stat().st_size
    adapter_bytes = sum(f.stat().st_size for f in ckpts[0].glob("*.safetensors"))
    assert adapter_bytes < base_bytes / 5
    options = json.loads((lora_run / "training_options.json").read_text())
    lora = options["config"]["stages"][0]["train"]["lora"]
    assert lora["targets"] == ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]


def test_a_lora_trained_here_gives_diffusers_the_same_images(tiny, lora_run, tmp_path):
    """`imagen export RUN` writes diffusers' LoRA file; IFPipeline.load_lora_weights with the
    fixed variance gives the images `imagen sample --lora` gives, at scale 1 and 0.5, fused
    or not."""
    from diffusers import DDPMScheduler, IFPipeline
    from safetensors import safe_open

    out = tmp_path / "lora"
    assert main(["export", str(lora_run), "--out", str(out)]) == 0
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") and ".lora_" in k for k in keys)
    assert "fixed_small" in (out / "README.md").read_text()
    ref_pipe = IFPipeline.from_pretrained(tiny["base"])
    ref_pipe.load_lora_weights(str(out))
    ref_pipe.scheduler = DDPMScheduler.from_pretrained(str(out), subfolder="scheduler")
    plain = _fixed_small(IFPipeline.from_pretrained(tiny["base"]))
    kw = dict(num_inference_steps=STEPS, output_type="pt")
    for scale, fuse in ((1.0, False), (0.5, True)):
        ref = ref_pipe(PROMPT, generator=_gen(3), cross_attention_kwargs={"scale": scale}, **kw)
        argv = ["sample", PROMPT, "--model", str(tiny["model"]), "--seed", "3", "--fp32"]
        argv += ["--steps-per-stage", f"{STEPS},2", "--save-stages", "--lora", f"{out}:{scale}"]
        ours = tmp_path / f"s{scale}"
        assert main([*argv, *(["--fuse"] if fuse else []), "--out", str(ours)]) == 0
        got = _png(ours / "0000_stage0.png")
        assert np.abs(got - _pixels(ref.images[0])).max() <= 1, (scale, fuse)
    without = plain(PROMPT, generator=_gen(3), **kw).images[0]
    assert np.abs(got - _pixels(without)).max() > 20  # the LoRA changes the images
    merged = tmp_path / "merged"  # a LoRA run as a stage of a model: merged into its base
    argv = ["export", str(lora_run), str(tiny["model"] / "stage1"), "--format", "imagen"]
    assert main([*argv, "--dtype", "fp32", "--out", str(merged)]) == 0
    argv = ["sample", PROMPT, "--model", str(merged), "--seed", "3", "--fp32", "--save-stages"]
    assert main([*argv, "--steps-per-stage", f"{STEPS},2", "--out", str(tmp_path / "m")]) == 0
    ref = ref_pipe(PROMPT, generator=_gen(3), **kw).images[0]
    assert np.abs(_png(tmp_path / "m" / "0000_stage0.png") - _pixels(ref)).max() <= 1


def test_a_peft_lora_in_diffusers_layout_gives_diffusers_images_here(tiny, tmp_path):
    from diffusers import IFPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from imagen.pipeline import ImagenPipeline

    maker = IFPipeline.from_pretrained(tiny["base"])
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
    maker.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets))
    torch.manual_seed(0)
    for name, p in maker.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    IFPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(maker.unet))
    ref_pipe = _fixed_small(IFPipeline.from_pretrained(tiny["base"]))
    ref_pipe.load_lora_weights(str(tmp_path))
    ref = ref_pipe(PROMPT, num_inference_steps=STEPS, generator=_gen(4), output_type="pt").images[0]
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    pipe = ImagenPipeline.from_pretrained(tiny["model"], dtype=torch.float32, lora=[str(lora)])
    assert pipe.loras == [{"path": str(lora), "stage": 0, "scale": 1.0, "rank": 2}]
    assert pipe.sampling_configs()[0].ddpm_variance == "posterior"  # while a LoRA is applied
    ours = pipe(PROMPT, steps=[STEPS, 2], seed=4, return_all_stages=True).stages[0][0]
    assert np.abs(np.asarray(ours).astype(int) - _pixels(ref)).max() <= 1
    from fastapi.testclient import TestClient

    from imagen.server.app import ServerConfig, create_app

    client = TestClient(create_app(pipe, ServerConfig(), "tiny"), base_url="http://localhost")
    assert client.get("/v1/model").json()["loras"] == pipe.loras  # what `serve --lora` shows


def test_a_low_memory_cascade_reattaches_its_lora_each_time(tiny, lora_run, tmp_path):
    from imagen.models.cascade import load_cascade
    from imagen.models.lora import apply_loras
    from imagen.pipeline import ImagenPipeline
    from imagen.training.lora_export import export_lora

    out = export_lora(lora_run, tmp_path / "lora")
    normal = load_cascade(tiny["model"])
    apply_loras(normal, [str(out)])
    want = ImagenPipeline(normal)(PROMPT, steps=[3, 2], seed=2).images[0]
    lean = load_cascade(tiny["model"], low_memory=True, weights_dtype=torch.float32)
    apply_loras(lean, [str(out)])
    for _ in range(2):  # loaded, released, loaded again
        got = ImagenPipeline(lean)(PROMPT, steps=[3, 2], seed=2).images[0]
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert all(next(s.unet.parameters()).is_meta for s in lean.stages)


def test_a_diffusers_export_loads_with_from_pretrained_and_matches_imagen_sample(tiny, tmp_path):
    """A full fine-tune of stage I (fixed variance after eps-only training) and the imported
    stage II as diffusers pipelines: DiffusionPipeline.from_pretrained gives, stage by stage,
    what `imagen sample` gives."""
    from diffusers import DiffusionPipeline, IFPipeline, IFSuperResolutionPipeline

    run = tmp_path / "full"
    _train(tiny, run, lora=False, steps=2)
    stages = [str(run), str(tiny["model"] / "stage1")]
    folder = tmp_path / "diffusers"
    assert (
        main(["export", *stages, "--format", "diffusers", "--dtype", "fp32", "--out", str(folder)])
        == 0
    )
    assert main(["export", *stages, "--dtype", "fp32", "--out", str(tmp_path / "model")]) == 0
    argv = ["sample", PROMPT, "--model", str(tmp_path / "model"), "--seed", "6", "--fp32"]
    assert (
        main(
            [
                *argv,
                "--steps-per-stage",
                f"{STEPS},4",
                "--save-stages",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    first = DiffusionPipeline.from_pretrained(folder / "stage0")
    second = DiffusionPipeline.from_pretrained(folder / "stage1")
    assert isinstance(first, IFPipeline) and isinstance(second, IFSuperResolutionPipeline)
    assert first.scheduler.config.variance_type == "fixed_small"  # fine-tuned: eps only
    assert second.scheduler.config.variance_type == "learned_range"  # as imported
    low = first(PROMPT, num_inference_steps=STEPS, generator=_gen(6), output_type="pt").images
    high = second(
        image=low, prompt=PROMPT, num_inference_steps=4, generator=_gen(6), output_type="pt"
    )
    for ours, ref in (("0000_stage0.png", low[0]), ("0000.png", high.images[0])):
        assert np.abs(_png(tmp_path / "s" / ours) - _pixels(ref)).max() <= 1, ours
    record = json.loads((folder / "stage1" / "imagen_export.json").read_text())
    assert record["diffusers_call"]["noise_level"] == 250


def test_a_lora_of_the_wrong_shape_is_one_line(tiny, lora_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from imagen.training.lora_export import export_lora

    good = export_lora(lora_run, tmp_path / "good") / "pytorch_lora_weights.safetensors"
    state = load_file(str(good))
    key = sorted(k for k in state if ".lora_A." in k)[0]
    state[key] = torch.zeros(4, 48)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    argv = ["sample", PROMPT, "--model", str(tiny["model"]), "--steps", "2"]
    assert main([*argv, "--lora", str(bad), "--out", str(tmp_path / "s")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and key.removeprefix("unet.") in err[0] and "[4, 48]" in err[0], err
    assert not (tmp_path / "s").exists()
    assert main([*argv, "--lora", f"{good}@5", "--out", str(tmp_path / "s")]) == 2
    assert "stage 5" in capsys.readouterr().err


class _Planted:
    """Unpickling this writes a file: a pickle LoRA must never get that far."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_lora_is_refused_without_being_unpickled(tiny, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"unet.x.lora_A.weight": _Planted(str(marker))})
    disguised = tmp_path / "disguised.safetensors"
    torch.save({"unet.x.lora_A.weight": torch.zeros(1)}, disguised)  # a zip, named safetensors
    (tmp_path / "folder").mkdir()
    for path in (tmp_path / "lora.bin", tmp_path / "folder" / "pytorch_lora_weights.bin"):
        path.write_bytes(payload)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load was called"))
    argv = ["sample", PROMPT, "--model", str(tiny["model"]), "--steps", "2"]
    for path in (tmp_path / "lora.bin", disguised, tmp_path / "folder"):
        assert main([*argv, "--lora", str(path), "--out", str(tmp_path / "s")]) == 2
        assert "pickle" in capsys.readouterr().err
    assert not marker.exists()


def test_a_safetensors_header_length_is_not_mistaken_for_a_pickle(tmp_path):
    """A pickle starts with 0x80; a safetensors header length may too (its low byte)."""
    import struct

    from safetensors.torch import save_file

    from imagen.models.lora import read_lora

    tensors = {"unet.a.lora_A.weight": torch.zeros(2, 4), "unet.a.lora_B.weight": torch.zeros(4, 2)}
    path = tmp_path / "lora.safetensors"
    for pad in range(512):
        save_file(tensors, str(path), metadata={"pad": "x" * pad})
        if struct.unpack("<Q", path.read_bytes()[:8])[0] & 0xFF == 0x80:
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert read_lora(path).modules == ["a"]


def test_lora_specs_parse_without_torch():
    from imagen.models.lora_spec import LoraSpec

    assert LoraSpec.parse("a/b.safetensors") == LoraSpec("a/b.safetensors", 1.0, None)
    assert LoraSpec.parse("a/b:0.75@1") == LoraSpec("a/b", 0.75, 1)
    assert LoraSpec.parse("dir@0") == LoraSpec("dir", 1.0, 0)
    assert LoraSpec.of(("x", 2, 1)) == LoraSpec("x", 2.0, 1)
    with pytest.raises(ValueError):
        LoraSpec.parse("")
