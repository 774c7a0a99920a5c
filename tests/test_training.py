import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from imagen.data.shapes import ShapesDataset
from imagen.data.sources import SourceKind, register_source, source_kinds
from imagen.models.cascade import load_cascade
from imagen.models.presets import tiny_base, tiny_sr
from imagen.models.stage import Stage
from imagen.text.encoders import TextEncoderConfig
from imagen.training.config import (
    CascadeRunConfig,
    DataConfig,
    StageRun,
    TrainConfig,
    parse_cascade_config,
)
from imagen.training.export import export_model
from imagen.training.rundir import RunDirectory
from imagen.training.trainer import NonFiniteLossError, Trainer, train_stage
from imagen.utils.tensors import load_tensors


def config(steps=6, stage="base", data=None, **train):
    st = tiny_base(16, 32) if stage == "base" else tiny_sr(16, 32)
    defaults = dict(
        batch_size=4,
        max_steps=steps,
        lr=1e-3,
        warmup_steps=2,
        checkpoint_every=3,
        sample_every=0,
        log_every=1,
        precision="fp32",
    )
    defaults.update(train)
    return CascadeRunConfig(
        TextEncoderConfig("hash-32", 12),
        data or DataConfig(),
        [StageRun(st, TrainConfig(**defaults))],
    )


def losses(run_dir):
    return [
        json.loads(line)["loss"] for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()
    ]


@pytest.mark.parametrize("stage", ["base", "sr"])
def test_tiny_stage_learns_shapes(tmp_path, stage):
    cfg = config(steps=80, stage=stage, lr=2e-3, batch_size=8, checkpoint_every=80)
    train_stage(cfg, 0, tmp_path / "run", progress=False)
    ls = losses(tmp_path / "run")
    assert sum(ls[-10:]) / 10 < 0.8 * sum(ls[:10]) / 10
    opts = json.loads((tmp_path / "run" / "training_options.json").read_text())
    assert opts["config"]["stages"][0]["train"]["max_steps"] == 80  # the resolved config is saved


class SlowShapes(ShapesDataset):
    """Shapes that take 0.3 s per batch to load."""

    def __getitems__(self, indices):
        time.sleep(0.3)
        return super().__getitems__(indices)


def data_wait(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    return [r["data_wait_fraction"] for r in rows[1:]]  # the first interval includes start-up


def test_log_says_how_long_the_loop_waited_for_data(tmp_path):
    if "slow-shapes" not in source_kinds():
        register_source(
            SourceKind(
                "slow-shapes",
                open=lambda opts, prep, split: SlowShapes(prep.size, opts.shapes),
                captions=lambda opts: ShapesDataset(8, opts.shapes).captions(),
                bounded=False,
                needs_path=False,
            )
        )
    train_stage(config(steps=5, checkpoint_every=100), 0, tmp_path / "fast", progress=False)
    slow = config(steps=5, checkpoint_every=100, data=DataConfig(kind="slow-shapes"))
    train_stage(slow, 0, tmp_path / "slow", progress=False)
    fast, starved = data_wait(tmp_path / "fast"), data_wait(tmp_path / "slow")
    assert all(0 <= f <= 1 for f in fast + starved)
    assert min(starved) > 0.5 and max(fast) < min(starved)


def test_stop_and_resume_equals_straight_through(tmp_path):
    train_stage(config(steps=6, precision="bf16"), 0, tmp_path / "straight", progress=False)
    train_stage(
        config(steps=6, precision="bf16"), 0, tmp_path / "split", max_steps=3, progress=False
    )
    train_stage(
        config(steps=6, precision="bf16"), 0, tmp_path / "split", resume=True, progress=False
    )
    a = load_tensors(RunDirectory(tmp_path / "straight").checkpoints()[-1] / "model.safetensors")
    b = load_tensors(RunDirectory(tmp_path / "split").checkpoints()[-1] / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    ea = load_tensors(RunDirectory(tmp_path / "straight").checkpoints()[-1] / "ema.safetensors")
    eb = load_tensors(RunDirectory(tmp_path / "split").checkpoints()[-1] / "ema.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")


def test_existing_run_needs_resume_and_same_model(tmp_path):
    train_stage(config(steps=3), 0, tmp_path / "r", progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train_stage(config(steps=3), 0, tmp_path / "r", progress=False)
    other = config(steps=5)
    other.stages[0].stage.unet.channels = 8
    with pytest.raises(ValueError, match="U-Net configuration differs"):
        train_stage(other, 0, tmp_path / "r", resume=True, progress=False)


def test_checkpoint_with_wrong_shapes_is_a_clear_error(tmp_path):
    from imagen.models.unet import UNet
    from imagen.training.optim import make_optimizer
    from imagen.training.parallel import Dist, Parallel, restore_checkpoint

    train_stage(config(steps=3), 0, tmp_path / "r", progress=False)
    cfg = tiny_base(16, 32).unet
    cfg.channels = 8
    model, ema = UNet(cfg), UNet(cfg)
    opt = make_optimizer(TrainConfig(), list(model.parameters()))
    with pytest.raises(ValueError, match="does not match the model configuration"):
        restore_checkpoint(
            RunDirectory(tmp_path / "r").checkpoints()[-1],
            model,
            ema,
            opt,
            Parallel("ddp", Dist(), torch.device("cpu")),
        )


def test_checkpoints_are_safetensors_and_json_only(tmp_path):
    train_stage(
        config(steps=3, keep_checkpoints=1, checkpoint_every=1), 0, tmp_path / "r", progress=False
    )
    (ckpt,) = RunDirectory(tmp_path / "r").checkpoints()  # only the last one is kept
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "ema.safetensors",
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]


def test_nan_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch):

    real = Stage.loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in (2, 3) or calls["n"] > 6 else loss

    monkeypatch.setattr(Stage, "loss", flaky)
    with pytest.raises(NonFiniteLossError, match="consecutive non-finite"):
        train_stage(
            config(steps=20, checkpoint_every=2, max_bad_steps=3), 0, tmp_path / "r", progress=False
        )
    last = RunDirectory(tmp_path / "r").checkpoints()[-1]
    state = json.loads((last / "state.json").read_text())
    # calls 2 and 3 were skipped (steps 2 and 3 made no update); 7, 8 and 9 stopped the run
    assert state["step"] == 6 and state["bad_steps"] == 2
    for p in last.glob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_tensors(p).values())


def test_corrupt_data_trains_to_the_end_and_reports(tmp_path):
    from test_data_readers import make_folder

    data = DataConfig(kind="folder", path=str(make_folder(tmp_path / "f")), min_size=16)
    summary = train_stage(config(steps=4, data=data), 0, tmp_path / "r", progress=False)
    assert summary["step"] == 4
    assert (
        summary["data_skipped"]["unreadable image"] >= 1
        and summary["data_skipped"]["missing caption"] == 1
    )


def test_webdataset_training(tmp_path):
    from test_data_readers import write_shards

    write_shards(tmp_path / "w")
    data = DataConfig(kind="webdataset", path=str(tmp_path / "w"), shuffle_buffer=3)
    summary = train_stage(config(steps=4, data=data), 0, tmp_path / "r", progress=False)
    assert summary["step"] == 4 and summary["data_skipped"]["unreadable image"] >= 1


def test_export_assembles_a_cascade_that_samples(tmp_path):
    train_stage(config(steps=2), 0, tmp_path / "base", progress=False)
    train_stage(config(steps=2, stage="sr"), 0, tmp_path / "sr", progress=False)
    root = export_model([tmp_path / "base", tmp_path / "sr"], tmp_path / "model")
    index = json.loads((root / "model_index.json").read_text())
    assert [r["steps"] for r in index["training"]] == [2, 2]
    cascade = load_cascade(root)
    out = cascade.sample(["a red circle on the left"], generator=torch.Generator().manual_seed(0))[
        0
    ]
    assert out.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="only the first stage of a cascade may be one"):
        export_model([tmp_path / "base", tmp_path / "base"], tmp_path / "bad")


def test_config_files(tmp_path):
    text = """
text_encoder: {name: hash-32, max_length: 12}
stages:
  - preset: tiny-base
    stage: {sampling: {steps: 7}}
    train: {batch_size: 2}
"""
    (tmp_path / "c.yaml").write_text(text)
    from imagen.training.config import load_cascade_config

    cfg = load_cascade_config(tmp_path / "c.yaml")
    assert cfg.stages[0].stage.sampling.steps == 7 and cfg.stages[0].train.batch_size == 2
    assert cfg.stages[0].stage.unet.channels == tiny_base().unet.channels
    again = parse_cascade_config(json.loads(json.dumps(cfg.to_dict())))  # resolved configs reload
    assert again == cfg
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        parse_cascade_config({"stages": [{"preset": "tiny-base", "train": {"batch": 2}}]})
    (tmp_path / "c.toml").write_text('[[stages]]\npreset = "tiny-base"\n')
    assert load_cascade_config(tmp_path / "c.toml").stages[0].train.batch_size == 32


TRAIN_SCRIPT = """
import sys
from imagen.training.config import CascadeRunConfig, DataConfig, StageRun, TrainConfig
from imagen.models.presets import tiny_base
from imagen.text.encoders import TextEncoderConfig
from imagen.training.trainer import train_stage
import torch
torch.set_num_threads(1)
cfg = CascadeRunConfig(TextEncoderConfig("hash-32", 12), DataConfig(), [StageRun(tiny_base(16, 32),
      TrainConfig(batch_size=2, max_steps=10_000, checkpoint_every=1, keep_checkpoints=2, sample_every=0,
                  log_every=1000, precision="fp32"))])
train_stage(cfg, 0, sys.argv[1], resume=True, progress=False)
"""


def test_sigkill_never_corrupts_the_latest_checkpoint(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    run = tmp_path / "run"
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = []
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, str(script), str(run)], env=env)
        deadline = time.time() + 60
        while (
            not RunDirectory(run).checkpoints() or RunDirectory(run).checkpoints()[-1] in steps[-1:]
        ):  # wait for a new one
            time.sleep(0.05)
            assert time.time() < deadline and proc.poll() is None
        time.sleep(rng.uniform(0.0, 0.5))  # then kill at a random moment of the checkpointing loop
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        dirs = RunDirectory(run).checkpoints()
        assert dirs, "no complete checkpoint survived"
        for d in dirs:  # every checkpoint that looks complete loads
            json.loads((d / "state.json").read_text())
            for f in ("model", "ema", "optimizer"):
                load_tensors(d / f"{f}.safetensors")
        steps.append(dirs[-1])
    assert len(set(steps)) == 5  # each restart resumed and made progress


DDP_SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
from imagen.training.config import CascadeRunConfig, DataConfig, StageRun, TrainConfig
from imagen.models.presets import tiny_base
from imagen.text.encoders import TextEncoderConfig
from imagen.training.trainer import train_stage
batch = int(sys.argv[2])
strategy = sys.argv[3] if len(sys.argv) > 3 else "ddp"
cfg = CascadeRunConfig(TextEncoderConfig("hash-32", 12), DataConfig(), [StageRun(tiny_base(16, 32),
      TrainConfig(batch_size=batch, max_steps=4, lr=1e-3, warmup_steps=1, checkpoint_every=2,
                  sample_every=2, num_val=2, log_every=1, precision="fp32", distributed=strategy))])
train_stage(cfg, 0, sys.argv[1], progress=False)
"""


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_equal_one_process_with_the_concatenated_batch(tmp_path, strategy):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(script),
        str(tmp_path / "two"),
        "2",
        strategy,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one"), "4"], env=env, check=True, timeout=300
    )
    opts = json.loads((tmp_path / "two" / "training_options.json").read_text())
    assert opts["world_size"] == 2
    torch.manual_seed(0)  # the trainer's initialisation, to show how far training moved the weights
    init = Stage(tiny_base(16, 32)).unet.state_dict()
    for name in ("model", "ema"):
        a = load_tensors(RunDirectory(tmp_path / "two").checkpoints()[-1] / f"{name}.safetensors")
        b = load_tensors(RunDirectory(tmp_path / "one").checkpoints()[-1] / f"{name}.safetensors")
        assert set(a) == set(b)
        moved = max((a[k] - init[k]).abs().max().item() for k in a)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        # Adam normalises each update, so round-off in near-zero gradients shows up at ~1e-5
        assert worst < 5e-5 and moved > 100 * worst, (worst, moved)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    assert (tmp_path / "two" / "samples_00000004.png").is_file()
    # a run checkpointed by 2 processes resumes in 1 (checkpoints hold full state dicts)
    resumed = subprocess.run(
        [sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]


RESUME_SCRIPT = (
    DDP_SCRIPT.replace("max_steps=4", "max_steps=5")
    .replace(
        "train_stage(cfg, 0, sys.argv[1], progress=False)",
        "train_stage(cfg, 0, sys.argv[1], resume=True, progress=False)",
    )
    .replace("int(sys.argv[2])", "2")
)


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    train_stage(config(steps=3, batch_size=4), 0, tmp_path / "big", progress=False)
    train_stage(config(steps=3, batch_size=2, grad_accum=2), 0, tmp_path / "acc", progress=False)
    a = load_tensors(RunDirectory(tmp_path / "big").checkpoints()[-1] / "model.safetensors")
    b = load_tensors(RunDirectory(tmp_path / "acc").checkpoints()[-1] / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 5e-5
    assert losses(tmp_path / "big") == pytest.approx(losses(tmp_path / "acc"), rel=1e-4)


def test_adafactor_trains_and_resumes_exactly(tmp_path):
    train_stage(config(steps=4, optimizer="adafactor"), 0, tmp_path / "s", progress=False)
    train_stage(
        config(steps=4, optimizer="adafactor"), 0, tmp_path / "r", max_steps=2, progress=False
    )
    train_stage(
        config(steps=4, optimizer="adafactor"), 0, tmp_path / "r", resume=True, progress=False
    )
    a = load_tensors(RunDirectory(tmp_path / "s").checkpoints()[-1] / "model.safetensors")
    b = load_tensors(RunDirectory(tmp_path / "r").checkpoints()[-1] / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_learning_rate_and_ema_schedules():
    from imagen.training.optim import ema_decay, lr_at

    cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, lr_schedule="cosine")
    assert lr_at(cfg, 0) == pytest.approx(1e-4) and lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 60) == pytest.approx(0.5e-3) and lr_at(cfg, 110) == pytest.approx(
        0.0, abs=1e-12
    )
    assert lr_at(TrainConfig(lr=1e-3, warmup_steps=10), 500) == 1e-3
    assert ema_decay(TrainConfig(ema_decay=0.999), 0, 32) == pytest.approx(0.1)
    assert ema_decay(TrainConfig(ema_decay=0.999), 10**6, 32) == 0.999
    half = TrainConfig(ema_halflife_images=320)
    assert ema_decay(half, 5, 32) ** 10 == pytest.approx(
        0.5
    )  # 10 steps of 32 images = one half-life


def test_train_command_line(tmp_path, capsys):
    from imagen.cli.main import main

    (tmp_path / "c.json").write_text(
        json.dumps(
            {
                "text_encoder": {"name": "hash-32", "max_length": 12},
                "stages": [
                    {
                        "preset": "tiny-base",
                        "train": {
                            "max_steps": 50,
                            "sample_every": 2,
                            "num_val": 2,
                            "checkpoint_every": 2,
                            "log_every": 1,
                        },
                    }
                ],
            }
        )
    )
    assert (
        main(
            [
                "train",
                str(tmp_path / "c.json"),
                "--stage",
                "0",
                "--out",
                str(tmp_path / "r"),
                "--max-steps",
                "2",
                "--batch-size",
                "3",
            ]
        )
        == 0
    )
    assert "step 2" in capsys.readouterr().out
    opts = json.loads((tmp_path / "r" / "training_options.json").read_text())
    assert opts["config"]["stages"][0]["train"]["batch_size"] == 3
    assert (tmp_path / "r" / "samples_00000002.png").is_file()
    assert (
        main(["train", str(tmp_path / "c.json"), "--stage", "3", "--out", str(tmp_path / "x")]) == 2
    )
    assert main(["export", str(tmp_path / "r"), "--out", str(tmp_path / "m")]) == 0
    assert main(["embed", str(tmp_path / "c.json"), "--out", str(tmp_path / "emb")]) == 0
    assert "bytes/caption" in capsys.readouterr().out
    from imagen.data.shapes import all_captions
    from imagen.text.cache import EmbeddingCache

    groups = all_captions()
    assert len(EmbeddingCache.open(tmp_path / "emb")) == len(groups["one"]) + len(groups["two"])


def test_training_reads_the_embedding_cache(tmp_path):
    from imagen.text.cache import build_cache
    from imagen.text.encoders import HashTextEncoder
    from imagen.training.captions import CaptionEmbeddings
    from imagen.training.data import dataset_captions

    enc = HashTextEncoder(32, 12)
    caps = dataset_captions(DataConfig())
    build_cache(caps[:50], enc, tmp_path / "c")
    from imagen.text.cache import EmbeddingCache

    embed = CaptionEmbeddings(enc, EmbeddingCache.open(tmp_path / "c", enc))
    emb = embed(caps[:10] + caps[100:102])
    assert embed.encoded == 2  # only the two captions outside the cache ran through the encoder
    direct = enc.encode(caps[:10] + caps[100:102])
    assert torch.allclose(emb.tokens[:, : direct.tokens.shape[1]], direct.tokens, atol=1e-2)
    with pytest.raises(ValueError, match="rebuild it"):
        CaptionEmbeddings(HashTextEncoder(32, 8), EmbeddingCache.open(tmp_path / "c"))


def test_wsd_schedule_holds_then_decays_linearly_to_zero():
    from imagen.training.optim import lr_at

    cfg = TrainConfig(
        lr=1e-3, warmup_steps=10, max_steps=100, lr_schedule="wsd", decay_fraction=0.2
    )
    assert lr_at(cfg, 9) == pytest.approx(1e-3) and lr_at(cfg, 80) == pytest.approx(1e-3)
    assert lr_at(cfg, 90) == pytest.approx(0.5e-3) and lr_at(cfg, 99) == pytest.approx(0.05e-3)


def test_a_stage_can_override_the_cascade_data():
    from imagen.training.config import parse_cascade_config

    cfg = parse_cascade_config(
        {
            "data": {"kind": "shapes", "num_workers": 0},
            "stages": [
                {"preset": "tiny-base", "data": {"shapes": {"two_object_fraction": 0.75}}},
                {"preset": "tiny-sr"},
            ],
        }
    )
    assert cfg.stages[0].data.shapes.two_object_fraction == 0.75
    assert cfg.stages[0].data.kind == "shapes" and cfg.stages[1].data is None
    assert cfg.data.shapes.two_object_fraction == 0.5


def test_caption_table_equals_the_memoised_encoder(hash_encoder):
    from imagen.training.captions import CaptionEmbeddings, CaptionTable

    caps = ["a red circle on the left", "a blue square above a green triangle", ""]
    table = CaptionTable(caps, CaptionEmbeddings(hash_encoder), torch.device("cpu"))
    memo = CaptionEmbeddings(hash_encoder)
    for batch in (caps, caps[:1], [caps[1], caps[0], caps[1]], ["an unseen caption"]):
        a, b = table(batch), memo(batch)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)


def test_a_full_memo_starts_again_without_losing_the_batch(hash_encoder):
    # a memo that fills up is cleared; the batch that overflowed it, captions it already held
    # included, is encoded again (a 6,000-step paraphrase run once stopped here with KeyError)
    from imagen.training.captions import CaptionEmbeddings

    memo, plain = CaptionEmbeddings(hash_encoder, memo_limit=3), CaptionEmbeddings(hash_encoder)
    memo(["a", "b"])
    for batch in (["a", "c", "d"], ["d", "e"], ["e", "e", "f", "g"]):
        got, want = memo(batch), plain(batch)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.mask, want.mask)
    assert memo.encoded == 2 + 3 + 2 + 3  # each overflow re-encodes its whole batch


def test_a_run_draws_its_loss_and_lr_curves(tmp_path):
    from PIL import Image

    train_stage(config(steps=6, checkpoint_every=3), 0, tmp_path / "r", progress=False)
    png = tmp_path / "r" / "curves.png"
    img = Image.open(png).convert("RGB")
    assert img.size == (720, 400)
    # the loss line (blue) is drawn in the top panel, the learning rate in the bottom one
    blue = [
        (x, y)
        for x in range(img.width)
        for y in range(img.height)
        if img.getpixel((x, y)) == (0, 0, 255)
    ]
    assert any(y < 200 for _, y in blue) and any(y >= 200 for _, y in blue)


def test_ema_update_with_an_on_device_skip(monkeypatch):
    """The gated EMA (weight on the device) equals lerp where the step is good and leaves the
    EMA untouched where it is not, also when the parameters span several groups; the ungated
    form is lerp; the pairs found once follow the model's in-place updates."""
    import imagen.training.optim as optim

    monkeypatch.setattr(optim, "EMA_GROUP_ELEMENTS", 100)
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(30, 20), torch.nn.Linear(30, 20)
    updater = optim.EMA(ema, model)
    assert updater.pairs is not None and len(updater.pairs) == 2  # weight 600, bias 20
    before = [p.clone() for p in ema.parameters()]
    updater.update(0.9, torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(before, ema.parameters(), strict=True))
    updater.update(0.9, torch.tensor(True))
    for e, b, m in zip(ema.parameters(), before, model.parameters(), strict=True):
        torch.testing.assert_close(e, torch.lerp(b, m, 0.1))
    with torch.no_grad():
        model.weight.add_(1.0)  # an optimiser step, in place
    before = [p.clone() for p in ema.parameters()]
    updater.update(0.5)
    for e, b, m in zip(ema.parameters(), before, model.parameters(), strict=True):
        torch.testing.assert_close(e, torch.lerp(b, m, 0.5))
    assert optim._groups([torch.zeros(60), torch.zeros(60), torch.zeros(300)]) == [[0], [1], [2]]
    assert optim._groups([torch.zeros(40), torch.zeros(60), torch.zeros(1)]) == [[0, 1], [2]]


def test_ema_of_a_model_in_another_dtype_reads_it_at_every_update():
    """A cast model is gathered again at each update (a cast made once would go stale)."""
    from imagen.training.optim import EMA

    model, ema = torch.nn.Linear(4, 3).to(torch.bfloat16), torch.nn.Linear(4, 3)
    updater = EMA(ema, model)
    assert updater.pairs is None
    with torch.no_grad():
        model.weight.fill_(2.0)
    updater.update(0.0)
    assert torch.equal(ema.weight, torch.full((3, 4), 2.0))


def test_dataloader_workers_are_automatic_unless_set(monkeypatch):
    from imagen.training.data import loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers(DataConfig(), gpu=False) == 0  # CPU cores run the step
    assert loader_workers(DataConfig(), gpu=True) == 14
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_workers(DataConfig(), gpu=True) == 2
    assert loader_workers(DataConfig(num_workers=3), gpu=True) == 3
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0"):
        DataConfig(num_workers=-1)


def test_compiled_training_falls_back_to_eager(tmp_path, monkeypatch, caplog):
    """compile with CUDA graphs requested, on a machine where compiling fails: one warning,
    then the run trains eagerly to the end."""

    def broken_compile(module, **options):
        assert options["mode"] == "reduce-overhead"

        def fail(*args, **kwargs):
            raise RuntimeError("no compiler here")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    cfg = config(steps=3, compile=True, compile_mode="reduce-overhead")
    summary = train_stage(cfg, 0, tmp_path / "run", progress=False)
    assert summary["step"] == 3 and "torch.compile failed" in caplog.text


def test_compiled_training_compiles_the_whole_micro_batch_loss(tmp_path, caplog):
    """compile on one process: draws, conditioning, U-Net and loss in one compiled graph (no
    fallback to eager), training as the eager step does."""
    train_stage(config(steps=3, checkpoint_every=100), 0, tmp_path / "eager", progress=False)
    cfg = config(steps=3, checkpoint_every=100, compile=True)
    trainer = Trainer(cfg, 0, tmp_path / "compiled", progress=False)
    trainer.run()
    assert trainer.loss_fn.compiled is not None and "torch.compile failed" not in caplog.text
    assert trainer.net is trainer.wrapped  # the U-Net is compiled inside the loss, not apart
    torch.testing.assert_close(
        losses(tmp_path / "compiled"), losses(tmp_path / "eager"), rtol=1e-5, atol=0
    )
