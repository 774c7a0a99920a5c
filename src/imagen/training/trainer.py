"""Training one stage of the cascade, on one CPU, one GPU or many processes (torchrun).

Every random draw of a training sample (timestep, noise, conditioning drop, augmentation) is a
pure function of (seed, global sample index), and sample i of the data is a pure function of i
(:mod:`imagen.training.data`): a run resumes exactly from model, EMA and optimiser state, and 2
processes with batch B compute the same update as 1 process with batch 2B.

A step never waits for the device: loss, gradient norm and skipped (non-finite) steps stay on
the device and are read every ``log_every`` steps and at checkpoints; each log record says what
fraction of its interval the loop waited for data (``data_wait_fraction``).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from imagen.models.model_dir import init_stage, load_stage
from imagen.models.stage import Stage
from imagen.models.stage_config import StageConfig, fine_tuned_config
from imagen.models.text_encoders import encoder_config
from imagen.text.encoders import (
    TextEmbedding,
    TextEncoder,
    check_encoder_matches,
    load_text_encoder,
)
from imagen.text.vocabulary import dataset_vocabulary
from imagen.training.captions import caption_lookup
from imagen.training.config import CascadeRunConfig, TrainConfig, init_stage_dir
from imagen.training.data import DrawSpec, draw_batch, training_batches
from imagen.training.distill import (
    UNIFORMS,
    DistillConfig,
    Distiller,
    init_from_teacher,
    student_config,
)
from imagen.training.monitor import (
    StepStats,
    plot_curves,
    tensorboard_writer,
    validation_batch,
    write_samples,
)
from imagen.training.optim import (
    EMA,
    clip_gradients,
    ema_decay,
    lr_at,
    make_optimizer,
    skips_on_device,
)
from imagen.training.parallel import Parallel, init_distributed, restore_checkpoint
from imagen.training.rundir import RunDirectory
from imagen.utils.compile import CompileFallback
from imagen.utils.system import hardware_description

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    """Trains stage ``stage_index`` of ``config`` into the run directory ``out_dir``.

    With ``resume`` the newest complete checkpoint there is restored (model, EMA, optimiser,
    step) and training continues exactly as if it had never stopped."""

    def __init__(
        self,
        config: CascadeRunConfig,
        stage_index: int,
        out_dir: str | Path,
        max_steps: int | None = None,
        resume: bool = False,
        text_encoder: TextEncoder | None = None,
        embedding_cache: Any | None = None,
        device: str | None = None,
        progress: bool = True,
        distill: DistillConfig | None = None,
    ) -> None:
        if not 0 <= stage_index < len(config.stages):
            raise ValueError(
                f"stage {stage_index} out of range: the config has {len(config.stages)}"
            )
        run = config.stages[stage_index]
        self.cfg: TrainConfig = replace(run.train, max_steps=max_steps or run.train.max_steps)
        self.d = init_distributed()
        self.dev = torch.device(
            device or (f"cuda:{self.d.local_rank}" if torch.cuda.is_available() else "cpu")
        )
        own = run.stage.text_encoder if run.init else None  # an init stage's own (x4: CLIP)
        encoder_cfg = encoder_config(own) if own else config.text_encoder
        self.encoder = text_encoder or load_text_encoder(encoder_cfg, self.dev)
        self.distill, self.teacher = distill, self._teacher(distill)
        stage = student_config(self.teacher.config, distill) if self.teacher else run.stage
        self.init = run.init
        stage = replace(stage, text_encoder=self.encoder.config())
        self.scfg: StageConfig = fine_tuned_config(stage)
        if self.scfg.unet.text_dim != self.encoder.dim:
            raise ValueError(
                f"stage {stage_index}: unet.text_dim is {self.scfg.unet.text_dim} but text "
                f"encoder {self.encoder.name!r} gives width {self.encoder.dim}; set "
                f"stage.unet.text_dim: {self.encoder.dim}"
            )
        self.config, self.stage_index, self.progress = config, stage_index, progress
        self.data = run.data or config.data
        self.run_dir = RunDirectory(out_dir)
        self.resume_from = self._prepare_run_dir(resume)
        self._build_models()
        self.embedding_cache = embedding_cache
        self.global_batch = self.cfg.batch_size * self.cfg.grad_accum * self.d.world
        timesteps = self.stage.schedule.num_timesteps
        self.spec = DrawSpec.of(self.scfg, self.cfg, timesteps, UNIFORMS if distill else 0)
        self.positions = self.spec.positions(self.dev)
        self.data_wait = 0.0  # seconds spent in next(batches) since the last log
        # what owns the loss: the stage, or a distillation objective around it
        self.objective = Distiller(self.stage, self.teacher, distill) if distill else self.stage

    # ---- set-up --------------------------------------------------------------------------
    def _options(self) -> dict[str, Any]:
        """The fully resolved configuration of this run, as written to training_options.json
        (with this stage's encoder record and step count)."""
        cfg = self.config.to_dict()
        cfg["stages"][self.stage_index].update(stage=asdict(self.scfg), train=asdict(self.cfg))
        options = {"stage_index": self.stage_index, "world_size": self.d.world, "config": cfg}
        if self.distill is not None:
            options["distill"] = asdict(self.distill)
        return options

    def _teacher(self, distill: DistillConfig | None) -> Stage | None:
        """The frozen teacher stage of a distillation run (None for ordinary training)."""
        if distill is None:
            return None
        teacher = load_stage(distill.teacher, self.dev)
        if teacher.config.text_encoder:
            check_encoder_matches(teacher.config.text_encoder, self.encoder)
        return teacher

    def _prepare_run_dir(self, resume: bool) -> Path | None:
        ckpt = self.run_dir.resume_checkpoint(resume)
        known = ckpt is not None and self.run_dir.options_path.is_file()
        if known and self.run_dir.stage_config().unet != self.scfg.unet:
            raise ValueError(
                f"cannot resume {self.run_dir.path}: its U-Net configuration differs from this one"
            )
        if self.d.main:
            self.run_dir.write_options(self._options())
        return ckpt

    def _build_models(self) -> None:
        cfg, dev = self.cfg, self.dev
        torch.manual_seed(cfg.seed)
        self.par = Parallel(cfg.distributed, self.d, dev)
        if dev.type == "cuda":  # shapes are fixed, so let cuDNN pick its fastest kernels
            torch.backends.cudnn.benchmark = True
        self._make_stages()
        self.model = self.stage.unet
        channels_last = cfg.channels_last if cfg.channels_last is not None else dev.type == "cuda"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.model.activation_checkpointing = cfg.activation_checkpointing
        self.par.shard(self.model)
        self.par.shard(self.ema_stage.unet)
        fused = cfg.optimizer == "adamw" and not self.par.sharded
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # found once
        self.optimizer = make_optimizer(cfg, self.params, fused=fused)
        self.step, self.samples_seen, bad_total = 0, 0, 0
        if self.resume_from is not None:
            self.step, self.samples_seen, bad_total = self._restore(self.resume_from)
            log.info("resumed from %s at step %d", self.resume_from, self.step)
            for g in self.optimizer.param_groups:  # this run's choice, not the checkpoint's
                g["fused"] = self.optimizer.defaults.get("fused")
        self.ema = EMA(self.ema_stage.unet, self.model)
        self.wrapped = self.par.wrap(self.model)
        self._compile()
        self.autocast = torch.bfloat16 if cfg.precision == "bf16" else None
        self.stats = StepStats(dev, bad_total)

    def _make_stages(self) -> None:  # the stage to train, its EMA twin (hook: training/lora.py)
        assert self.cfg.lora is None, "train.lora runs train with training.lora.train_stage"
        with torch.device(self.dev):  # initialised where it trains (fast for billion-weight models)
            self.stage, self.ema_stage = Stage(self.scfg), Stage(self.scfg)
        if self.teacher is not None:
            init_from_teacher(self.stage, self.teacher)
        if self.init is not None:  # a model's stage: weights, null caption (for dropout), space
            init_stage(self.stage, init_stage_dir(self.init))
        self.ema_stage.null_text, self.ema_stage.space = self.stage.null_text, self.stage.space
        self.ema_stage.unet.load_state_dict(self.stage.unet.state_dict())
        self.ema_stage.requires_grad_(False).eval()

    def _restore(self, path: Path) -> tuple[int, int, int]:  # step, samples seen, bad steps
        return restore_checkpoint(path, self.model, self.ema_stage.unet, self.optimizer, self.par)

    def _weights(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:  # collective under FSDP
        return self.par.model_state(self.model), self.par.model_state(self.ema_stage.unet)

    def _compile(self) -> None:
        """With ``compile``: on one process the whole loss of a micro-batch (draws,
        conditioning, U-Net, weighted error) is compiled as one graph, so CUDA graphs
        (``reduce-overhead``) leave no small kernels to launch one by one; across processes
        (DDP, FSDP) only the U-Net is, as those wrappers want."""
        cfg, options = self.cfg, {"dynamic": False, "mode": self.cfg.compile_mode}
        whole = cfg.compile and self.d.world == 1 and not self.par.sharded
        compile_net = cfg.compile and not whole
        self.net = CompileFallback(self.wrapped, **options) if compile_net else self.wrapped
        self.loss_fn = CompileFallback(self._micro_loss, **options) if whole else self._micro_loss
        self.first = torch.zeros((), dtype=torch.int64, device=self.dev)

    def _micro_loss(
        self, images: Tensor, tokens: Tensor, mask: Tensor, first: Tensor, positions: Tensor
    ) -> Tensor:
        """The loss of one micro-batch whose first sample has global index ``first`` (a 0-d
        tensor on the device): its random draws, then the objective's loss."""
        draws = draw_batch(self.spec, first, images.shape[0], self.dev, positions)
        text = TextEmbedding(tokens, mask)
        return self.objective.loss(images, text, draws, self.autocast, self.net)

    # ---- one step ------------------------------------------------------------------------
    def train_step(self, batches: Any, notes: Counter[str]) -> Tensor:
        """One optimiser step over ``grad_accum`` micro-batches; returns the mean loss (on the
        device). A non-finite loss skips the update but uses up the step and its data."""
        cfg, d = self.cfg, self.d
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(cfg, self.step)
        total = torch.zeros((), device=self.dev)
        for m in range(cfg.grad_accum):
            waited = time.perf_counter()
            images, captions, batch_notes = next(batches)
            self.data_wait += time.perf_counter() - waited
            notes.update(batch_notes)
            first = self.step * self.global_batch + (m * d.world + d.rank) * cfg.batch_size
            self.first.fill_(first)  # a kernel argument: no copy, no wait
            images = images.to(self.dev, non_blocking=True).contiguous(
                memory_format=self.memory_format
            )
            torch.manual_seed(cfg.seed * 1_000_003 + first)  # dropout, if any
            if cfg.compile:  # a new iteration: CUDA-graph outputs of the last may be reused
                torch.compiler.cudagraph_mark_step_begin()
            last_micro = m == cfg.grad_accum - 1 or d.world == 1
            # gradients are all-reduced on the last micro-batch of a step only
            with self.par.accumulating(self.wrapped, last_micro):
                text = self.embed(captions)
                loss = self.loss_fn(images, text.tokens, text.mask, self.first, self.positions)
                (loss / cfg.grad_accum).backward()
            total += loss.detach() / cfg.grad_accum
        if d.world > 1:
            dist.all_reduce(total)
            total /= d.world
        self._update(total)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples_seen += self.global_batch
        return total

    def _update(self, loss: Tensor) -> None:
        """Optimiser and EMA update, skipped where ``loss`` is not finite: on the device for
        fused AdamW, else after reading the loss back."""
        ok = torch.isfinite(loss)
        decay = ema_decay(self.cfg, self.step, self.global_batch)
        if skips_on_device(self.optimizer):
            norm = clip_gradients(self.params, self.cfg.grad_clip)
            self.optimizer.found_inf = (~ok).float()
            self.optimizer.step()
            self.ema.update(decay, ok)
        elif bool(ok):
            norm = clip_gradients(self.params, self.cfg.grad_clip)
            self.optimizer.step()
            self.ema.update(decay)
        else:
            norm = None
        self.stats.add(loss, ok, norm)

    # ---- the loop ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to ``max_steps`` (or the time budget); returns the run's summary."""
        cfg, d = self.cfg, self.d
        pin = self.dev.type == "cuda"
        batches, dataset = training_batches(self.data, self.scfg, cfg, d, self.step, pin_memory=pin)
        self.embed = caption_lookup(
            dataset, self.encoder, self.embedding_cache, self.dev, fixed=cfg.compile
        )
        if d.main and (words := dataset_vocabulary(dataset)) is not None:
            self.run_dir.write_vocabulary(words)  # the model's vocabulary
        self.logf = self.run_dir.open_log() if d.main else None
        self.tb = tensorboard_writer(self.run_dir.path) if d.main else None
        sample_here = cfg.sample_every and (d.main or self.par.sharded)
        self.val = validation_batch(dataset, cfg.num_val) if sample_here else None
        self.hardware = hardware_description(self.dev)
        self.notes: Counter[str] = Counter(getattr(dataset, "scan_skipped", {}))
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=not (self.progress and d.main),
            desc=f"stage {self.stage_index}",
            dynamic_ncols=True,
        )
        self.t_last = self.started = time.time()
        self.data_wait = 0.0
        try:
            while self.step < cfg.max_steps:
                self.train_step(batches, self.notes)
                bar.update(1)
                if not self._after_step(bar):
                    break
        finally:
            bar.close()
            if self.logf is not None:
                self.logf.close()
            if self.tb is not None:
                self.tb.close()
        return self._summary()

    def _after_step(self, bar: tqdm) -> bool:
        """Logging, checkpoints and sample grids due after a step; False to stop (time)."""
        cfg, step = self.cfg, self.step
        out_of_time = bool(cfg.time_budget_s) and time.time() - self.started > cfg.time_budget_s
        last = step == cfg.max_steps or out_of_time
        if step % cfg.log_every == 0 or last:
            self._log(bar)
        if step % cfg.checkpoint_every == 0 or last:
            self._checkpoint()
        if self.val is not None and (step % cfg.sample_every == 0 or last):
            # under FSDP every rank takes part in the sharded forward passes
            self._sample_grid()
        if out_of_time:
            log.info("time budget of %.0f s reached at step %d", cfg.time_budget_s, step)
        return not out_of_time

    def _check_bad_run(self, stats: dict[str, float]) -> int:
        """The current run of consecutive non-finite steps; stops training when too long."""
        bad_run = int(stats["bad_run"])
        if bad_run >= self.cfg.max_bad_steps:
            raise NonFiniteLossError(
                f"{bad_run} consecutive non-finite losses at step {self.step}; stopping. "
                f"The last good checkpoint in {self.run_dir.path / 'checkpoints'} is intact."
            )
        if bad_run:
            log.warning("non-finite loss at step %d skipped (%d in a row)", self.step, bad_run)
        return bad_run

    def _log(self, bar: tqdm) -> None:
        """Read the interval's statistics back (the one sync of the interval) and log them."""
        stats = self.stats.read()
        self._check_bad_run(stats)
        good = stats["good"]
        if good == 0:
            return
        now = time.time()
        interval, self.t_last = now - self.t_last, now
        data_wait, self.data_wait = self.data_wait, 0.0
        self.stats.new_interval()
        if not self.d.main:
            return
        rate = good / max(interval, 1e-9)
        rec = {
            "step": self.step,
            "loss": stats["loss_sum"] / good,
            "lr": lr_at(self.cfg, self.step - 1),
            "log_interval_s": interval,
            "hardware": self.hardware,
            "grad_norm": stats["norm"] if self.cfg.grad_clip > 0 else float("nan"),
            "steps_per_s": rate,
            "samples_per_s": rate * self.global_batch,
            "data_wait_fraction": min(1.0, data_wait / max(interval, 1e-9)),
            "samples_seen": self.samples_seen,
            "bad_steps": int(stats["bad_total"]),
            "time": now,
        }
        if self.notes:
            rec["data_skipped"] = dict(self.notes)
        self.logf.write(json.dumps(rec) + "\n")
        self.logf.flush()
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm", "samples_per_s", "data_wait_fraction"):
                self.tb.add_scalar(f"train/{key}", rec[key], self.step)
        bar.set_postfix(
            loss=f"{rec['loss']:.4f}", it_s=f"{rate:.2f}", img_s=f"{rec['samples_per_s']:.0f}"
        )

    def _checkpoint(self) -> None:
        """Write a checkpoint, unless in the middle of a run of non-finite steps."""
        stats = self.stats.read()
        if self._check_bad_run(stats):
            return
        states = (*self._weights(), self.par.optimizer_state(self.model, self.optimizer))
        if self.d.main:
            extra = {"samples_seen": self.samples_seen, "bad_steps": int(stats["bad_total"])}
            self.run_dir.save_checkpoint(self.step, *states, extra, self.cfg.keep_checkpoints)
            self._plot()
        if self.d.world > 1:
            dist.barrier()

    def _sample_grid(self) -> None:
        path = self.run_dir.sample_grid_path(self.step)
        write_samples(self.ema_stage, self.encoder, self.val, path, self.cfg.seed, self.d.main)

    def _summary(self) -> dict[str, Any]:
        summary = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "bad_steps": int(self.stats.bad_total),
            "data_skipped": dict(self.notes),
            "run_dir": str(self.run_dir.path),
        }
        if self.notes:
            log.warning("data records skipped or converted: %s", dict(self.notes))
        if self.d.main:
            self.run_dir.write_summary(summary)
            self._plot()
        return summary

    def _plot(self) -> None:
        """Redraw the run's loss and learning-rate curves (RUN_DIR/curves.png)."""
        if self.logf is not None:
            self.logf.flush()
        records = self.run_dir.read_log()
        if records:
            plot_curves(records, self.run_dir.curves_path())


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
    distill: DistillConfig | None = None,
) -> dict[str, Any]:
    """Train stage ``stage_index`` of ``config`` into ``out_dir`` (with ``distill``, a
    student of a trained stage); returns a summary (see :class:`Trainer`)."""
    args = (config, stage_index, out_dir, max_steps, resume, text_encoder, embedding_cache)
    return Trainer(*args, device, progress, distill).run()
