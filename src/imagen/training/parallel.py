"""Data parallelism for the trainer, on torch.distributed (launched by torchrun): DDP, or FSDP
(``torch.distributed.fsdp.fully_shard``) for stages too large for one device. One process per
device; one process with no launcher is the plain single-device case.

Checkpoints always hold full, unsharded state dicts, so a run can resume under another
strategy or world size, and export needs no distributed set-up.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from imagen.training.checkpoint import read_checkpoint

STRATEGIES = ("ddp", "fsdp")


@dataclass
class Dist:
    """This process's place in the process group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group that torchrun (or accelerate launch) describes, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        # left to interpreter teardown, gloo's threads can abort the process at exit
        atexit.register(dist.destroy_process_group)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


class Parallel:
    """How one model (and its EMA twin) is spread over the processes."""

    def __init__(self, strategy: str, d: Dist, device: torch.device) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"distributed strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.strategy = strategy if d.world > 1 else "single"
        self.d, self.device = d, device

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    def shard(self, model: nn.Module) -> None:
        """FSDP: shard every block of the U-Net, then the rest (in place); else nothing."""
        if not self.sharded:
            return
        from torch.distributed.fsdp import fully_shard

        for module in [*getattr(model, "down", []), *getattr(model, "up", [])]:
            fully_shard(module)
        fully_shard(model)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to call in training (DDP wraps; FSDP has sharded in place)."""
        if self.strategy == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    @contextlib.contextmanager
    def accumulating(self, wrapped: nn.Module, last_micro_batch: bool) -> Iterator[None]:
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if last_micro_batch or self.strategy == "single":
            yield
        elif self.strategy == "ddp":
            with wrapped.no_sync():
                yield
        else:
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)

    # ---- full, unsharded state dicts (collective under FSDP: every rank must call) ---------
    def _options(self, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kwargs)

    def model_state(self, model: nn.Module) -> dict[str, Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=self._options(cpu_offload=self.sharded))

    def load_model_state(self, model: nn.Module, state: dict[str, Tensor], source: str) -> None:
        """Load a full state dict, strictly: differences are listed in the error."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        from imagen.utils.tensors import check_state

        check_state(model, state, source)
        set_model_state_dict(model, state, options=self._options(strict=True))

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimiser state keyed by parameter name (the same under every strategy)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=self._options(cpu_offload=self.sharded)
        )

    def load_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        if not self.sharded and all(isinstance(k, int) for k in state["state"]):
            optimizer.load_state_dict(state)  # keyed by index (checkpoints of version 0.1)
            return
        set_optimizer_state_dict(model, optimizer, state, options=self._options())

    @staticmethod
    def reshard(model: nn.Module) -> None:
        """FSDP keeps the root's parameters gathered after a forward pass with no backward (as in
        sampling); shard them again so that element-wise updates see local shards."""
        for module in model.modules():
            if hasattr(module, "reshard"):
                module.reshard()

    @staticmethod
    def local(tensors: list[Tensor]) -> list[Tensor]:
        """The local shards of (possibly sharded) tensors, for element-wise updates like EMA."""
        return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


def restore_checkpoint(
    path: Path, model: nn.Module, ema: nn.Module, optimizer: Any, par: Parallel
) -> tuple[int, int, int]:
    """Load a checkpoint into model, EMA and optimiser (strictly); returns (step, samples seen,
    skipped steps)."""
    model_state, ema_state, opt_state, state = read_checkpoint(path)
    par.load_model_state(model, model_state, str(path / "model.safetensors"))
    par.load_model_state(ema, ema_state, str(path / "ema.safetensors"))
    par.load_optimizer_state(model, optimizer, opt_state)
    return state["step"], state["samples_seen"], state.get("bad_steps", 0)
