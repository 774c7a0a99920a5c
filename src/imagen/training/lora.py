"""LoRA training (``train.lora`` in a stage's training settings): PEFT adapters on the
attention projections of a stage started from a model (``init:``), the base weights frozen and
held in bf16 (``lora.base_dtype``).

:class:`LoraTrainer` is the trainer with four hooks changed: the stage is the base with two
adapters, ``default`` (trained: float32, the optimiser's only parameters) and ``ema`` (its
exponential moving average, sampled in the grids), so no second copy of the base exists;
checkpoints hold the adapters alone (``model.safetensors`` and ``ema.safetensors`` with PEFT's
keys, the optimiser state of the adapter), and resume restores them exactly. DDP wraps the
network as usual (only the adapter's gradients are all-reduced); FSDP is refused (a frozen
bf16 base is what LoRA makes fit one device). The loss is the stage's own (the prediction
only), so a stage with a learned variance records the fixed posterior variance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from imagen.models.lora import adapter_state, add_adapter, lora_settings_config, set_active
from imagen.models.lora_spec import LoraSettings
from imagen.models.model_dir import load_stage
from imagen.models.networks import get_network
from imagen.training.checkpoint import CheckpointError, read_checkpoint
from imagen.training.config import CascadeRunConfig, init_stage_dir
from imagen.training.optim import EMA
from imagen.training.trainer import Trainer
from imagen.training.trainer import train_stage as train_whole_stage
from imagen.utils.lowmem import compute_in_float32
from imagen.utils.tensors import check_state

TRAINED, AVERAGED = "default", "ema"  # the adapters' names
BASE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def train_stage(
    config: CascadeRunConfig, stage_index: int, *args: Any, **kwargs: Any
) -> dict[str, Any]:
    """:func:`imagen.training.trainer.train_stage` (same arguments) for every run: a stage
    with ``train.lora`` trains its adapter with :class:`LoraTrainer`, any other the whole
    stage."""
    if config.stages[stage_index].train.lora is None:
        return train_whole_stage(config, stage_index, *args, **kwargs)
    return LoraTrainer(config, stage_index, *args, **kwargs).run()


def resolved_settings(config: CascadeRunConfig, stage_index: int) -> CascadeRunConfig:
    """``config`` with stage ``stage_index``'s LoRA targets resolved (the network kind's
    defaults where none are given), so the run records exactly what it adapts."""
    run = config.stages[stage_index]
    lora = run.train.lora
    assert lora is not None
    if run.init is None:
        raise ValueError(
            f"stage {stage_index}: train.lora needs a base model: set init: MODEL_DIR[:K]"
        )
    if run.train.distributed == "fsdp":
        raise ValueError(
            f"stage {stage_index}: train.lora runs under DDP, not FSDP (the base is frozen)"
        )
    targets = lora.targets or list(get_network(run.stage.network).lora_targets)
    if not targets:
        raise ValueError(
            f"stage {stage_index}: network {run.stage.network!r} has no default LoRA targets"
        )
    train = replace(run.train, lora=replace(lora, targets=targets))
    stages = list(config.stages)
    stages[stage_index] = replace(run, train=train)
    return replace(config, stages=stages)


def peft_config(settings: LoraSettings) -> Any:
    """PEFT's LoraConfig of a run's settings (targets resolved)."""
    assert settings.targets is not None
    return lora_settings_config(
        settings.rank, settings.lora_alpha, settings.dropout, settings.targets
    )


def adapter_params(network: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Adapter ``name``'s parameters by their name without the adapter's (module order)."""
    return {
        n.replace(f".{name}.", "."): p
        for n, p in network.named_parameters()
        if f".{name}." in n and ".lora_" in n
    }


class LoraTrainer(Trainer):
    """:class:`~imagen.training.trainer.Trainer` of an adapter (see the module's docstring)."""

    def __init__(
        self, config: CascadeRunConfig, stage_index: int, *args: Any, **kwargs: Any
    ) -> None:
        distill = kwargs.get("distill") or (args[7] if len(args) > 7 else None)
        if distill is not None:
            raise ValueError("train.lora cannot be combined with distillation")
        super().__init__(resolved_settings(config, stage_index), stage_index, *args, **kwargs)

    @property
    def settings(self) -> LoraSettings:
        assert self.cfg.lora is not None
        return self.cfg.lora

    def _make_stages(self) -> None:
        """The base stage from ``init`` (weights in ``lora.base_dtype``, frozen) with the
        trained adapter and its EMA; the stage is its own EMA twin."""
        dtype = BASE_DTYPES[self.settings.base_dtype]
        stage = load_stage(init_stage_dir(self.init), self.dev, dtype).train()  # type: ignore[arg-type]
        stage.config = self.scfg  # the run's: this encoder's record, the fixed variance
        network = stage.unet.requires_grad_(False)
        if dtype != torch.float32 and self.cfg.precision == "fp32":
            compute_in_float32(network)  # bf16 weights, float32 arithmetic
        if self.cfg.activation_checkpointing and hasattr(network, "enable_gradient_checkpointing"):
            network.enable_gradient_checkpointing()  # diffusers' U-Net (IF): its own blocks
        config = peft_config(self.settings)
        with torch.random.fork_rng(devices=[self.dev] if self.dev.type == "cuda" else []):
            torch.manual_seed(self.settings.init_seed)
            add_adapter(network, TRAINED, config)
        add_adapter(network, AVERAGED, replace(config, lora_dropout=0.0))
        with torch.no_grad():
            averaged = adapter_params(network, AVERAGED)
            for k, p in adapter_params(network, TRAINED).items():
                averaged[k].copy_(p)
        set_active(network, [TRAINED])  # trainable; the EMA adapter and the base frozen
        self.stage = self.ema_stage = stage

    def _build_models(self) -> None:
        super()._build_models()
        # the trainer made an EMA of the stage with itself (no copy); the EMA is the adapter's
        network = self.stage.unet
        self.ema = EMA(
            _ParamView(adapter_params(network, AVERAGED)),
            _ParamView(adapter_params(network, TRAINED)),
        )

    def _weights(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        network = self.stage.unet
        return adapter_state(network, TRAINED), adapter_state(network, AVERAGED)

    def _restore(self, path: Path) -> tuple[int, int, int]:
        from peft import set_peft_model_state_dict

        model, ema, optimizer, state = read_checkpoint(path)
        network = self.stage.unet
        want = adapter_state(network, TRAINED)
        for name, weights in (("model", model), ("ema", ema)):
            try:
                check_state(_StateView(want), weights, f"{path / name}.safetensors")
            except ValueError as e:
                raise CheckpointError(f"{e} (not this run's adapter)") from None
        set_peft_model_state_dict(network, model, adapter_name=TRAINED)
        set_peft_model_state_dict(network, ema, adapter_name=AVERAGED)
        self.par.load_optimizer_state(self.model, self.optimizer, optimizer)
        return state["step"], state["samples_seen"], state.get("bad_steps", 0)

    def _sample_grid(self) -> None:
        with self._averaged():
            super()._sample_grid()

    @contextlib.contextmanager
    def _averaged(self) -> Iterator[None]:
        """The EMA adapter active (and dropout off) for sampling, then training again."""
        network = self.stage.unet
        network.eval()
        set_active(network, [AVERAGED])
        try:
            yield
        finally:
            network.train()
            set_active(network, [TRAINED])


class _ParamView(nn.Module):
    """Parameters of another module, in a given order, as a module's (for :class:`EMA`)."""

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        super().__init__()
        self.params = list(params.values())

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:  # type: ignore[override]
        return iter(self.params)


class _StateView(nn.Module):
    """A module whose state dict is a given one (for :func:`check_state`)."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        super().__init__()
        self._state = state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:  # type: ignore[override]
        return self._state
