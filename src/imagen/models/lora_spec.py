"""LoRA adapters described without torch (the command line parses them before importing it):
:class:`LoraSpec` (a LoRA file to apply to a stage, ``PATH[:SCALE][@STAGE]``) and
:class:`LoraSettings` (``train.lora`` of a training config). Applying, training and saving
adapters is :mod:`imagen.models.lora` (PEFT)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' name for a LoRA file
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
BASE_DTYPES = ("bf16", "fp32")

_SPEC = re.compile(
    r"^(?P<path>.+?)(?::(?P<scale>[-+]?[0-9.]+(?:[eE][-+]?\d+)?))?(?:@(?P<stage>\d+))?$"
)


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file to apply: its path (a ``.safetensors`` file or the folder holding
    ``pytorch_lora_weights.safetensors``), its scale (1: as trained) and the stage it adapts
    (None: the stage the file records, else stage 0, the stage DeepFloyd IF LoRAs are for)."""

    path: str
    scale: float = 1.0
    stage: int | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.scale):
            raise ValueError(f"LoRA {self.path}: the scale must be a finite number")
        if self.stage is not None and self.stage < 0:
            raise ValueError(f"LoRA {self.path}: the stage must be >= 0")

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``PATH``, ``PATH:SCALE``, ``PATH@STAGE`` or ``PATH:SCALE@STAGE`` (a scale is a number,
        a stage an index: ``style.safetensors:0.8@0``)."""
        m = _SPEC.match(text.strip())
        if not text.strip() or m is None:
            raise ValueError(f"expected PATH[:SCALE][@STAGE], got {text!r}")
        scale, stage = m.group("scale"), m.group("stage")
        try:
            value = 1.0 if scale is None else float(scale)
        except ValueError:
            raise ValueError(f"{text!r}: the scale after ':' must be a number") from None
        return cls(m.group("path"), value, None if stage is None else int(stage))

    @classmethod
    def of(cls, item: LoraSpec | str | tuple) -> LoraSpec:
        """A spec from a spec, a ``PATH[:SCALE][@STAGE]`` string or a (path, scale[, stage])
        tuple (the forms the pipeline's ``lora=`` takes)."""
        if isinstance(item, LoraSpec):
            return item
        if isinstance(item, str):
            return cls.parse(item)
        if isinstance(item, tuple) and 1 <= len(item) <= 3:
            scale = float(item[1]) if len(item) > 1 else 1.0
            stage = int(item[2]) if len(item) > 2 and item[2] is not None else None
            return cls(str(item[0]), scale, stage)
        raise ValueError(f"a LoRA is PATH[:SCALE][@STAGE] or (path, scale, stage), got {item!r}")


@dataclass
class LoraSettings:
    """``train.lora``: train a low-rank adapter (PEFT's LoRA) of the stage's attention
    projections instead of the whole network; the base stays frozen."""

    rank: int = 4  # r: the adapter's rank
    alpha: float | None = None  # lora_alpha; None: the rank (scale 1, diffusers' convention)
    dropout: float = 0.0  # dropout on the adapter's input, in training only
    # module names (suffixes) to adapt; None: the network kind's attention projections
    # (IF: to_q, to_k, to_v, to_out.0, add_k_proj, add_v_proj; imagen: to_q, to_kv, text_kv, out)
    targets: list[str] | None = None
    base_dtype: str = "bf16"  # how the frozen base weights are held: bf16 or fp32
    init_seed: int = 0  # seed of the adapter's random initialisation (lora_A)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"lora.alpha must be a number > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.targets is not None:
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise ValueError("lora.targets must be a non-empty list of module names")
            self.targets = list(self.targets)
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"lora.base_dtype must be bf16 or fp32, got {self.base_dtype!r}")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)
