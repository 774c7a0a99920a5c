"""The optimiser, learning-rate schedule, EMA and gradient clipping of the trainer.

Nothing here reads a value back from the device: a non-finite step is skipped on the device
(fused AdamW's ``found_inf``, and an EMA weight of zero), so a GPU step never waits for the host.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from imagen.training.config import TrainConfig
from imagen.training.parallel import Parallel


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant, cosine decay to zero at max_steps, or warm-up-stable-
    decay (``wsd``: constant, then linear decay to zero over the last ``decay_fraction``)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.lr_schedule == "wsd":
        decay = max(1, round(cfg.decay_fraction * cfg.max_steps))
        return cfg.lr * min(1.0, max(0.0, (cfg.max_steps - step) / decay))
    return cfg.lr


def ema_decay(cfg: TrainConfig, step: int, global_batch: int) -> float:
    """EMA decay for this step: from a half-life in images (EDM), else ``ema_decay`` warmed up
    as min(decay, (1 + step) / (10 + step))."""
    if cfg.ema_halflife_images:
        return 0.5 ** (global_batch / cfg.ema_halflife_images)
    return min(cfg.ema_decay, (1 + step) / (10 + step))


EMA_GROUP_ELEMENTS = 1 << 24  # parameters per foreach group: bounds the update's temporary


class EMA:
    """Keeps ``ema`` an exponential moving average of ``model``'s weights:
    ema <- decay * ema + (1 - decay) * model, on local shards when the models are sharded.

    Each update runs a few multi-tensor kernels per group of parameters, never one kernel per
    parameter. For plain (unsharded) models of one dtype the parameter pairs and their groups
    are found once here, so an update costs no Python walk over the modules; sharded or cast
    parameters are gathered again at every update."""

    def __init__(self, ema: nn.Module, model: nn.Module) -> None:
        self.ema, self.model = ema, model
        plain = all(
            not hasattr(p, "to_local") and p.dtype == e.dtype
            for p, e in zip(model.parameters(), ema.parameters(), strict=True)
        )
        self.pairs = self._pairs() if plain else None

    def _pairs(self) -> list[tuple[list[Tensor], list[Tensor]]]:
        """(EMA tensors, model tensors of the same dtype) per group."""
        Parallel.reshard(self.ema)
        ema_p = Parallel.local(list(self.ema.parameters()))
        model_p = Parallel.local(list(self.model.parameters()))
        model_p = [
            p if p.dtype == e.dtype else p.to(e.dtype) for p, e in zip(model_p, ema_p, strict=True)
        ]
        return [([ema_p[i] for i in g], [model_p[i] for i in g]) for g in _groups(ema_p)]

    @torch.no_grad()
    def update(self, decay: float, ok: Tensor | None = None) -> None:
        """One EMA step; where ``ok`` (a 0-d bool tensor on the device) is False the EMA is left
        as it is, without the host reading ``ok``."""
        pairs = self.pairs if self.pairs is not None else self._pairs()
        if ok is None:
            for ema_p, model_p in pairs:
                torch._foreach_lerp_(ema_p, model_p, 1 - decay)
            return
        # the weight stays on the device (no host sync): ema += w * (model - ema)
        w = ok.to(pairs[0][0][0].dtype) * (1 - decay)
        for ema_p, model_p in pairs:
            diff = torch._foreach_sub(model_p, ema_p)
            torch._foreach_mul_(diff, w)
            torch._foreach_add_(ema_p, diff)


def _groups(params: list[Tensor]) -> list[list[int]]:
    """Consecutive indices of ``params`` in groups of at most EMA_GROUP_ELEMENTS elements (a
    larger parameter forms a group of its own)."""
    groups: list[list[int]] = [[]]
    size = 0
    for i, p in enumerate(params):
        if groups[-1] and size + p.numel() > EMA_GROUP_ELEMENTS:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += p.numel()
    return groups


def make_optimizer(
    cfg: TrainConfig, params: list[nn.Parameter], fused: bool = False
) -> torch.optim.Optimizer:
    """AdamW (fused into one kernel when ``fused``: it can skip a step on the device) or
    Adafactor."""
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused or None
    )


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` skips a step itself when given ``found_inf`` (fused AdamW)."""
    return all(g.get("fused") for g in optimizer.param_groups)


def clip_gradients(params: list[Tensor], max_norm: float) -> Tensor | None:
    """Clip the global gradient norm of ``params`` (sharded or not); returns the norm before
    clipping, on the device (None when clipping is off)."""
    if max_norm <= 0:
        return None
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
