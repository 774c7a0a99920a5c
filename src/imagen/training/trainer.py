"""Training one stage of the cascade, on one CPU, one GPU or many processes (torchrun).

Every random draw of a training sample (its timestep, noise, conditioning drop, augmentation
level and noise) is a pure function of (seed, global sample index), and sample i of the data
is a pure function of i. A run is therefore exactly resumable from model, EMA and optimiser
state alone, and 2 processes with batch B compute the same update as 1 process with batch 2B.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from tqdm import tqdm

from imagen.data.shapes import ShapesDataset, all_captions, tensor_to_pil
from imagen.diffusion.guidance import Conditioning
from imagen.diffusion.schedules import NoiseSchedule
from imagen.models.cascade import Stage, StageConfig, augment_lowres, resize
from imagen.models.unet import UNet
from imagen.text.encoders import (
    TextEmbedding,
    TextEncoder,
    load_text_encoder,
    pad_embeddings,
    unpad_embeddings,
)
from imagen.training.checkpoint import checkpoint_dirs, read_checkpoint, save_checkpoint
from imagen.training.config import CascadeRunConfig, DataConfig, TrainConfig
from imagen.training.parallel import Dist, Parallel, init_distributed
from imagen.utils.grid import captioned_grid
from imagen.utils.system import hardware_description

log = logging.getLogger(__name__)


# ---- data --------------------------------------------------------------------------------
class StepBatchSampler(Sampler[list[int]]):
    """Yields this process's index list for each (step, micro-batch) from ``start_step`` on:
    global step s covers indices [s G, (s + 1) G), G = batch x accum x world, interleaved so
    that the split across processes does not change which samples a step sees."""

    def __init__(
        self,
        batch: int,
        accum: int,
        dist_info: Dist,
        start_step: int,
        max_steps: int,
        length: int | None = None,
    ) -> None:
        self.batch, self.accum, self.d = batch, accum, dist_info
        self.start, self.stop, self.length = start_step, max_steps, length

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accum

    def __iter__(self) -> Iterator[list[int]]:
        g = self.batch * self.accum * self.d.world
        for step in range(self.start, self.stop):
            for m in range(self.accum):
                base = step * g + (m * self.d.world + self.d.rank) * self.batch
                idx = list(range(base, base + self.batch))
                yield [i % self.length for i in idx] if self.length else idx


def make_dataset(data: DataConfig, stage: StageConfig, training: bool = True) -> Dataset:
    """The map-style dataset a stage trains on, yielding (image in [-1, 1] at the stage's
    resolution, caption, notes on records skipped or converted to produce it)."""
    if data.kind == "shapes":
        return ShapesDataset(stage.resolution, data.shapes)
    from imagen.data.folders import ImageTextFolder

    if data.kind == "folder":
        return ImageTextFolder(
            data.path,
            stage.resolution,
            random_crop=training and data.random_crop,
            min_size=data.min_size,
            seed=data.seed,
            resize_to=data.resize_to,
            hflip=data.hflip,
        )
    raise ValueError(f"data kind {data.kind!r} is not map-style; use the webdataset loader")


def dataset_captions(data: DataConfig) -> list[str]:
    """Every caption a training run on ``data`` can see (for the embedding cache)."""
    if data.kind == "shapes":
        groups = all_captions(data.shapes.holdout_pairs())
        return groups["one"] + groups["two"]
    if data.kind == "folder":
        from imagen.data.folders import ImageTextFolder

        return ImageTextFolder(data.path, 8).captions()
    from imagen.data.webdataset import shard_captions

    return shard_captions(data.path)


Batch = tuple[Tensor, list[str], Counter[str]]


def collate(batch: list[tuple[Tensor, str, tuple[str, ...]]]) -> Batch:
    """Stack a batch; the third element counts the records skipped or converted to make it
    (an item with an empty image carries only such counts)."""
    notes = Counter(n for _, _, ns in batch for n in ns)
    kept = [(img, cap) for img, cap, _ in batch if img.numel()]
    if not kept:
        return torch.empty(0), [], notes
    images, captions = zip(*kept, strict=True)
    return torch.stack(images), list(captions), notes


def training_batches(
    data: DataConfig, stage: StageConfig, cfg: TrainConfig, d: Dist, start_step: int
) -> tuple[Iterator[Batch], Dataset]:
    """This process's micro-batches from ``start_step`` on, and the dataset behind them.

    Map-style data (Shapes, folders) are indexed by global sample number, so a resumed run
    sees exactly the samples it would have seen. WebDataset shards are a stream: a resumed run
    starts a new pass over its shards (the pass number reshuffles them)."""
    if data.kind != "webdataset":
        dataset = make_dataset(data, stage)
        length = None if data.kind == "shapes" else len(dataset)
        sampler = StepBatchSampler(
            cfg.batch_size, cfg.grad_accum, d, start_step, cfg.max_steps, length
        )
        loader = DataLoader(
            dataset, batch_sampler=sampler, num_workers=data.num_workers, collate_fn=collate
        )
        return iter(loader), dataset
    from imagen.data.webdataset import WebDatasetSource

    def source(epoch: int) -> WebDatasetSource:
        return WebDatasetSource(
            data.path,
            stage.resolution,
            d.rank,
            d.world,
            data.shuffle_buffer,
            data.random_crop,
            data.min_size,
            data.seed,
            epoch,
            data.resize_to,
            data.hflip,
        )

    def stream() -> Iterator[Batch]:
        epoch, carry = start_step, Counter()
        while True:
            loader = DataLoader(
                source(epoch),
                batch_size=cfg.batch_size,
                num_workers=data.num_workers,
                collate_fn=collate,
            )
            produced = False
            for images, captions, notes in loader:
                carry.update(notes)
                if len(captions) < cfg.batch_size:  # a short last batch: only its counts are kept
                    continue
                produced = True
                yield images, captions, carry
                carry = Counter()
            if not produced:
                raise ValueError(
                    f"no full batch of usable samples in {data.path} (skipped: {dict(carry)})"
                )
            epoch += 1

    return stream(), source(0)


# ---- per-sample randomness ---------------------------------------------------------------
def sample_generator(seed: int, index: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


@dataclass
class SampleNoise:
    t: Tensor  # (B,) training timesteps
    noise: Tensor  # (B, C, H, W)
    drop: Tensor  # (B,) bool: replace the caption by the null condition
    aug_level: Tensor | None  # (B,) SR augmentation level in [0, aug_max); None for base stages
    aug_noise: Tensor | None  # (B, C, H, W); None for base stages


def draw_noise(
    seed: int,
    indices: list[int],
    shape: tuple[int, ...],
    timesteps: int,
    cfg: TrainConfig,
    augment: bool,
) -> SampleNoise:
    """Every random draw for the given global sample indices (independent of batching). The
    augmentation draws, made last, are skipped for base stages, which do not use them."""
    ts, noises, drops, levels, aug_noises = [], [], [], [], []
    for i in indices:
        g = sample_generator(seed, i)
        ts.append(torch.randint(0, timesteps, (1,), generator=g))
        noises.append(torch.randn(shape, generator=g))
        drops.append(torch.rand(1, generator=g) < cfg.cond_drop)
        if augment:
            levels.append(torch.rand(1, generator=g) * cfg.aug_max)
            aug_noises.append(torch.randn(shape, generator=g))
    return SampleNoise(
        torch.cat(ts),
        torch.stack(noises),
        torch.cat(drops),
        torch.cat(levels) if augment else None,
        torch.stack(aug_noises) if augment else None,
    )


# ---- text --------------------------------------------------------------------------------
class CaptionEmbeddings:
    """Embeddings for training captions: read from an on-disk cache (``imagen embed``) where it
    holds them, else computed by the encoder; memoised here, as captions repeat across epochs."""

    def __init__(self, encoder: TextEncoder, cache: Any | None = None, memo_limit: int = 200_000):
        if cache is not None:
            cache.check(encoder)
        self.encoder, self.cache, self.memo_limit = encoder, cache, memo_limit
        self.memo: dict[str, Tensor] = {}
        self.encoded = 0  # captions that had to be run through the encoder

    def __call__(self, captions: list[str]) -> TextEmbedding:
        missing = [c for c in dict.fromkeys(captions) if c not in self.memo]
        if missing:
            if len(self.memo) + len(missing) > self.memo_limit:
                self.memo.clear()
            cached = [c for c in missing if self.cache is not None and c in self.cache]
            fresh = [c for c in missing if self.cache is None or c not in self.cache]
            rows = self.cache.lookup(cached) if cached else []
            if fresh:
                rows += unpad_embeddings(self.encoder.encode(fresh))
                self.encoded += len(fresh)
            for c, r in zip(cached + fresh, rows, strict=True):
                self.memo[c] = r.to(torch.float16).cpu()
        return pad_embeddings([self.memo[c] for c in captions])


# ---- EMA, learning rate ------------------------------------------------------------------
def ema_decay(cfg: TrainConfig, step: int, global_batch: int) -> float:
    if cfg.ema_halflife_images:
        return 0.5 ** (global_batch / cfg.ema_halflife_images)
    return min(cfg.ema_decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, on local shards when the models are sharded."""
    Parallel.reshard(ema)
    ema_p = Parallel.local(list(ema.parameters()))
    model_p = Parallel.local([p.detach() for p in model.parameters()])
    torch._foreach_lerp_(
        ema_p, [p.to(e.dtype) for p, e in zip(model_p, ema_p, strict=True)], 1 - decay
    )


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant or cosine decay to zero at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (sharded or not); returns the norm before clipping."""
    if max_norm <= 0:
        return float("nan")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def restore_checkpoint(
    path: Path, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer, par: Parallel
) -> tuple[int, int, int]:
    """Load a checkpoint into model, EMA and optimiser (strictly); returns (step, samples seen,
    skipped steps)."""
    model_state, ema_state, opt_state, state = read_checkpoint(path)
    par.load_model_state(model, model_state, str(path / "model.safetensors"))
    par.load_model_state(ema, ema_state, str(path / "ema.safetensors"))
    par.load_optimizer_state(model, optimizer, opt_state)
    return state["step"], state["samples_seen"], state.get("bad_steps", 0)


# ---- the loss ----------------------------------------------------------------------------
def diffusion_loss(
    model: nn.Module,
    schedule: NoiseSchedule,
    stage: StageConfig,
    images: Tensor,
    text: TextEmbedding,
    rnd: SampleNoise,
    autocast: torch.dtype | None,
) -> Tensor:
    """The weighted denoising loss of one batch (Ho et al. 2020 eq. 14, with the stage's target
    and loss weighting), with conditioning dropout and SR noise-conditioning augmentation."""
    device = images.device
    t = rnd.t.to(device)
    noise = rnd.noise.to(device)
    cond = Conditioning(text.tokens.to(device), text.mask.to(device))
    drop = rnd.drop.to(device)
    cond.text = torch.where(drop[:, None, None], torch.zeros_like(cond.text), cond.text)
    cond.mask = cond.mask & ~drop[:, None]
    if stage.is_super_resolution:
        lowres = resize(images, stage.lowres_size)
        cond.lowres, cond.aug_level = augment_lowres(
            lowres, stage.resolution, rnd.aug_level.to(device), schedule, rnd.aug_noise.to(device)
        )
    xt = schedule.q_sample(images, t, noise)
    target = schedule.target(images, noise, t)
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        pred = model(xt, t.float(), cond.text, cond.mask, cond.lowres, cond.aug_level)
    per_sample = (pred.float() - target).pow(2).flatten(1).mean(1)
    return (schedule.loss_weight(t) * per_sample).mean()


# ---- the trainer -------------------------------------------------------------------------
class NonFiniteLossError(RuntimeError):
    pass


def train_stage(
    config: CascadeRunConfig,
    stage_index: int,
    out_dir: str | Path,
    max_steps: int | None = None,
    resume: bool = False,
    text_encoder: TextEncoder | None = None,
    embedding_cache: Any | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train stage ``stage_index`` of ``config`` into ``out_dir``; returns a summary.

    With ``resume`` the newest complete checkpoint in ``out_dir`` is restored (model, EMA,
    optimiser, step) and training continues exactly as if it had never stopped.
    """
    if not 0 <= stage_index < len(config.stages):
        raise ValueError(f"stage {stage_index} out of range: the config has {len(config.stages)}")
    run = config.stages[stage_index]
    cfg, scfg = run.train, run.stage
    if max_steps is not None:
        cfg.max_steps = max_steps
    d = init_distributed()
    dev = torch.device(device or (f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    encoder = text_encoder or load_text_encoder(config.text_encoder, dev)
    scfg.text_encoder = encoder.config()
    if scfg.unet.text_dim != encoder.dim:
        raise ValueError(
            f"stage {stage_index}: unet.text_dim is {scfg.unet.text_dim} but text encoder "
            f"{encoder.name!r} gives width {encoder.dim}; set stage.unet.text_dim: {encoder.dim}"
        )
    options = {"stage_index": stage_index, "world_size": d.world, "config": config.to_dict()}
    opt_path = out / "training_options.json"
    ckpts = checkpoint_dirs(out)
    if resume and ckpts and opt_path.is_file():
        old = json.loads(opt_path.read_text())
        old_stage = old["config"]["stages"][old["stage_index"]]["stage"]
        if old_stage["unet"] != json.loads(json.dumps(asdict(scfg)["unet"])):
            raise ValueError(f"cannot resume {out}: its U-Net configuration differs from this one")
    elif ckpts and not resume:
        raise FileExistsError(
            f"{out} already holds checkpoints; pass --resume or choose another --out"
        )
    if d.main:
        opt_path.write_text(json.dumps(options, indent=2) + "\n")

    torch.manual_seed(cfg.seed)
    par = Parallel(cfg.distributed, d, dev)
    stage = Stage(scfg).to(dev)
    model: UNet = stage.unet
    ema_stage = Stage(scfg).to(dev)
    ema_stage.unet.load_state_dict(model.state_dict())
    ema_stage.requires_grad_(False).eval()
    mem = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=mem)
    par.shard(model)
    par.shard(ema_stage.unet)
    optimizer = make_optimizer(cfg, list(model.parameters()))
    step, samples_seen, bad_total = 0, 0, 0
    if resume and ckpts:
        step, samples_seen, bad_total = restore_checkpoint(
            ckpts[-1], model, ema_stage.unet, optimizer, par
        )
        log.info("resumed from %s at step %d", ckpts[-1], step)
    train_model = par.wrap(model)
    schedule = stage.schedule
    autocast = torch.bfloat16 if cfg.precision == "bf16" else None
    embed = CaptionEmbeddings(encoder, embedding_cache)
    batches, dataset = training_batches(config.data, scfg, cfg, d, step)
    global_batch = cfg.batch_size * cfg.grad_accum * d.world
    shape = (scfg.unet.in_channels, scfg.resolution, scfg.resolution)
    logf = open(out / "log.jsonl", "a") if d.main else None  # noqa: SIM115
    tb = tensorboard_writer(out) if d.main else None
    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        disable=not (progress and d.main),
        desc=f"stage {stage_index}",
        dynamic_ncols=True,
    )
    samples_here = cfg.sample_every and (d.main or par.sharded)
    val = validation_batch(dataset, cfg.num_val) if samples_here else None
    hardware = hardware_description(dev)
    bad_run, t_last, losses, grad_norm = 0, time.time(), [], float("nan")
    started = t_last
    data_notes: Counter[str] = Counter(getattr(dataset, "scan_skipped", {}))
    try:
        while step < cfg.max_steps:
            for g in optimizer.param_groups:
                g["lr"] = lr_at(cfg, step)
            total = torch.zeros((), device=dev)
            for m in range(cfg.grad_accum):
                images, captions, notes = next(batches)
                data_notes.update(notes)
                first = step * global_batch + (m * d.world + d.rank) * cfg.batch_size
                indices = list(range(first, first + cfg.batch_size))
                rnd = draw_noise(
                    cfg.seed, indices, shape, schedule.num_timesteps, cfg, scfg.is_super_resolution
                )
                images = images.to(dev).contiguous(memory_format=mem)
                torch.manual_seed(cfg.seed * 1_000_003 + first)  # dropout, if any
                last_micro = m == cfg.grad_accum - 1 or d.world == 1
                # gradients are all-reduced on the last micro-batch of a step only
                with par.accumulating(train_model, last_micro):
                    loss = diffusion_loss(
                        train_model, schedule, scfg, images, embed(captions), rnd, autocast
                    )
                    (loss / cfg.grad_accum).backward()
                total += loss.detach() / cfg.grad_accum
            if d.world > 1:
                dist.all_reduce(total)
                total /= d.world
            loss_value = float(total)
            if math.isfinite(loss_value):
                bad_run = 0
                grad_norm = clip_gradients(model, cfg.grad_clip)

                optimizer.step()
                update_ema(ema_stage.unet, model, ema_decay(cfg, step, global_batch))
                losses.append(loss_value)
            else:  # the step is skipped: its data and step number are used up, weights untouched
                bad_run, bad_total = bad_run + 1, bad_total + 1
                log.warning("non-finite loss at step %d skipped (%d in a row)", step, bad_run)
                if bad_run >= cfg.max_bad_steps:
                    raise NonFiniteLossError(
                        f"{bad_run} consecutive non-finite losses at step {step}; stopping. "
                        f"The last good checkpoint in {out / 'checkpoints'} is intact."
                    )
            optimizer.zero_grad(set_to_none=True)
            step += 1
            samples_seen += global_batch
            bar.update(1)
            if d.main and losses and (step % cfg.log_every == 0 or step == cfg.max_steps):
                now = time.time()
                rate = len(losses) / max(now - t_last, 1e-9)
                rec = {
                    "step": step,
                    "loss": sum(losses) / len(losses),
                    "lr": lr_at(cfg, step - 1),
                    "log_interval_s": now - t_last,
                    "hardware": hardware,
                    "grad_norm": grad_norm,
                    "steps_per_s": rate,
                    "samples_per_s": rate * global_batch,
                    "samples_seen": samples_seen,
                    "bad_steps": bad_total,
                    "time": now,
                }
                if data_notes:
                    rec["data_skipped"] = dict(data_notes)
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                if tb is not None:
                    for key in ("loss", "lr", "grad_norm", "samples_per_s"):
                        tb.add_scalar(f"train/{key}", rec[key], step)
                bar.set_postfix(
                    loss=f"{rec['loss']:.4f}",
                    it_s=f"{rate:.2f}",
                    img_s=f"{rate * global_batch:.0f}",
                )
                t_last, losses = now, []
            out_of_time = bool(cfg.time_budget_s) and time.time() - started > cfg.time_budget_s
            checkpoint_due = (
                step % cfg.checkpoint_every == 0 or step == cfg.max_steps or out_of_time
            )
            if checkpoint_due and bad_run == 0:  # never checkpoint in the middle of a bad run
                states = (
                    par.model_state(model),
                    par.model_state(ema_stage.unet),
                    par.optimizer_state(model, optimizer),
                )  # collective under FSDP
                if d.main:
                    save_checkpoint(
                        out,
                        step,
                        *states,
                        {"samples_seen": samples_seen, "bad_steps": bad_total},
                        cfg.keep_checkpoints,
                    )
                if d.world > 1:
                    dist.barrier()
            if val is not None and (
                step % cfg.sample_every == 0 or step == cfg.max_steps or out_of_time
            ):
                # under FSDP every rank takes part in the sharded forward passes
                _write_samples(
                    ema_stage, encoder, val, out / f"samples_{step:08d}.png", cfg.seed, d.main
                )
            if out_of_time:
                log.info("time budget of %.0f s reached at step %d", cfg.time_budget_s, step)
                break
    finally:
        bar.close()
        if logf is not None:
            logf.close()
        if tb is not None:
            tb.close()
    summary = {
        "step": step,
        "samples_seen": samples_seen,
        "bad_steps": bad_total,
        "data_skipped": dict(data_notes),
        "run_dir": str(out),
    }
    if data_notes:
        log.warning("data records skipped or converted: %s", dict(data_notes))
    if d.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def tensorboard_writer(out: Path) -> Any:
    """A TensorBoard writer into RUN_DIR/tensorboard when the tensorboard package is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def validation_batch(dataset: Dataset | IterableDataset, n: int) -> tuple[Tensor, list[str]]:
    """The first ``n`` samples: fixed captions (and images) for the sample grids."""
    items = (
        [dataset[i] for i in range(n)]
        if isinstance(dataset, Dataset) and not isinstance(dataset, IterableDataset)
        else list(itertools.islice(iter(dataset), n))
    )
    images, captions, _ = collate(items)
    return images, captions


@torch.no_grad()
def _write_samples(
    stage: Stage,
    encoder: TextEncoder,
    val: tuple[Tensor, list[str]],
    path: Path,
    seed: int,
    write: bool = True,
) -> None:
    """Sample the validation captions with the EMA model (SR stages upsample the real
    low-res images) and save a grid: real images on top, samples below."""
    images, captions = val
    cfg = stage.config
    lowres = resize(images, cfg.lowres_size) if cfg.is_super_resolution else None
    gen = torch.Generator(device=stage.device).manual_seed(seed)
    out = stage.sample(encoder.encode(captions), lowres, generator=gen).clamp(-1, 1)
    if not write:
        return
    pics = [tensor_to_pil(x) for x in torch.cat([images.cpu(), out.cpu()])]
    captioned_grid(
        pics,
        ["(data) " + c for c in captions] + captions,
        columns=len(captions),
        tile=max(64, cfg.resolution),
    ).save(path)
