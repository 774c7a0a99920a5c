"""Run configuration: typed dataclasses with one source of defaults, read from YAML, TOML or
JSON. A cascade file names the text encoder, the data and, per stage, a preset, overrides of
its fields and the training settings::

    text_encoder: {name: minilm, max_length: 32}
    data: {kind: shapes}
    stages:
      - preset: shapes-base32
        train: {batch_size: 32, max_steps: 4000}
      - preset: shapes-sr64
        stage: {sampling: {aug_level: 0.1}}
        train: {batch_size: 16}
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imagen.data.config import DataConfig
from imagen.models.lora_spec import LoraSettings
from imagen.models.lowres import BLUR_MAX
from imagen.models.model_dir import read_index, read_stage_config
from imagen.models.presets import get_preset
from imagen.models.stage_config import StageConfig
from imagen.models.text_encoders import encoder_config
from imagen.models.validate import check_stage_config
from imagen.text.encoders import TextEncoderConfig
from imagen.utils.config import config_from_dict, load_config_file, show_value

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    """How one stage is trained. Batch sizes are per process; the global batch is
    batch_size x grad_accum x world size."""

    batch_size: int = 32
    grad_accum: int = 1  # micro-batches per optimiser step
    max_steps: int = 1000
    optimizer: str = "adamw"  # adamw | adafactor (the paper's choice for its base model)
    lr: float = 1e-4  # peak learning rate (the paper: 1e-4)
    warmup_steps: int = 100  # linear warm-up (the paper: 10k)
    lr_schedule: str = "constant"  # constant | cosine (to 0 at max_steps) | wsd (see below)
    decay_fraction: float = 0.2  # wsd: constant lr, then linear decay over this final fraction
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # max global gradient norm (0 disables)
    cond_drop: float = 0.1  # fraction of captions replaced by the null condition (for guidance)
    aug_max: float = 0.5  # SR stages: augmentation levels drawn uniformly from [0, aug_max]
    blur_max: float = 0.0  # SR stages: Gaussian blur of the low-res image, sigma (low-res
    # pixels) drawn uniformly from [0, blur_max] per sample (Cascaded Diffusion Models'
    # conditioning augmentation); teaches crisp detail from soft input. 0: none; at most 1.5
    ema_decay: float = 0.999  # EMA decay, warmed up as min(decay, (1 + step) / (10 + step))
    ema_halflife_images: float | None = None  # if set, EMA by half-life in images (EDM style)
    precision: str = "bf16"  # bf16 (autocast) | fp32
    distributed: str = "ddp"  # with several processes: ddp, or fsdp (sharded, for large stages)
    channels_last: bool | None = None  # NHWC memory format; None: on for CUDA (measured
    # faster there), off on CPU (measured slower)
    compile: bool = False  # torch.compile the U-Net for training (eager if it cannot compile)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs
    # of the forward and backward passes: for small, launch-bound models on GPUs) | max-autotune
    activation_checkpointing: bool = False  # recompute U-Net blocks in the backward pass
    # (less memory, so larger batches of large stages; about a third more compute)
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    sample_every: int = 500  # 0 disables the sample grid
    num_val: int = 8  # validation captions in the sample grid
    max_bad_steps: int = 5  # consecutive NaN/Inf losses that stop the run
    time_budget_s: float = 0.0  # stop (with a checkpoint) after this much training time; 0: none
    lora: LoraSettings | None = None  # train a LoRA adapter only (training/lora.py); needs init

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if isinstance(self.lora, dict):
            self.lora = config_from_dict(LoraSettings, self.lora, "train.lora")
        if self.optimizer not in ("adamw", "adafactor"):
            raise ValueError(f"optimizer must be adamw or adafactor, got {self.optimizer!r}")
        if self.lr_schedule not in ("constant", "cosine", "wsd"):
            raise ValueError(
                f"lr_schedule must be constant, cosine or wsd, got {self.lr_schedule!r}"
            )
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.distributed not in ("ddp", "fsdp"):
            raise ValueError(f"distributed must be ddp or fsdp, got {self.distributed!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}"
            )
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be bf16 or fp32, got {self.precision!r}")
        for name in (
            "batch_size",
            "grad_accum",
            "max_steps",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ValueError(f"cond_drop must be in [0, 1), got {self.cond_drop}")
        if not 0.0 <= self.aug_max < 1.0:
            raise ValueError(f"aug_max must be in [0, 1), got {self.aug_max}")
        if not 0.0 <= self.blur_max <= BLUR_MAX:
            raise ValueError(f"blur_max must be in [0, {BLUR_MAX}], got {self.blur_max}")
        self._check_ranges()

    def _check_ranges(self) -> None:
        """The optimiser's and the EMA's numbers: in the ranges where they mean something."""
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.ema_halflife_images is not None and self.ema_halflife_images <= 0:
            raise ValueError(f"ema_halflife_images must be > 0, got {self.ema_halflife_images}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("warmup_steps", "sample_every", "num_val", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip", "time_budget_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class StageRun:
    """Everything needed to train one stage: its model, its training settings and, where this
    stage's data differ from the cascade's, its own data settings."""

    stage: StageConfig
    train: TrainConfig
    data: DataConfig | None = None  # None: the cascade's data
    # MODEL_DIR or MODEL_DIR:K: start from stage K (default 0) of a model directory (an
    # imported DeepFloyd IF model, say): its configuration, weights and null caption
    init: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = config_from_dict(DataConfig, self.data)


@dataclass
class CascadeRunConfig:
    """A whole cascade: the text encoder, the data, and each stage's model and training."""

    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageRun] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` merged into ``base`` recursively (override wins)."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML, TOML or JSON file into a dict, within the size, nesting and alias limits
    of :func:`~imagen.utils.config.load_config_file`; a syntax error is a one-line ValueError
    naming the file and the line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    data = load_config_file(p)
    if not isinstance(data, dict):
        raise ValueError(f"{p} must hold a mapping at the top level")
    return data


def parse_cascade_config(data: dict[str, Any]) -> CascadeRunConfig:
    """Resolve a cascade config dict: presets expanded, overrides merged, fields typed.
    Also accepts an already resolved config (stages with a full ``stage`` and no preset)."""
    unknown = set(data) - {"text_encoder", "data", "stages"}
    if unknown:
        raise ValueError(f"unknown top-level config key(s): {', '.join(sorted(unknown))}")
    te = config_from_dict(TextEncoderConfig, data.get("text_encoder", {}), "text_encoder")
    data_dict = data.get("data", {})
    dc = config_from_dict(DataConfig, data_dict, "data")
    stages = []
    entries = data.get("stages", [])
    if not isinstance(entries, list):
        raise ValueError(f"stages: expected a list of stage entries, got {show_value(entries)}")
    for i, entry in enumerate(entries):
        _check_stage_entry(i, entry)
        init = entry.get("init")
        base = get_preset(entry["preset"]).to_dict() if "preset" in entry else {}
        if init is not None:
            base = read_stage_config(init_stage_dir(init)).to_dict()
        stage_dict = deep_merge(base, entry.get("stage") or {})
        try:
            stage = config_from_dict(StageConfig, stage_dict, "stage")
            check_stage_config(stage, "stage")  # sizes a network can be built from
            train = config_from_dict(TrainConfig, entry.get("train") or {}, "train")
            own = entry.get("data")
            merged = deep_merge(data_dict, own) if own else None
            stage_data = config_from_dict(DataConfig, merged, "data") if merged else None
        except (TypeError, ValueError) as e:
            raise ValueError(f"stage {i}: {e}") from e
        stages.append(StageRun(stage, train, stage_data, init))
    if not stages:
        raise ValueError("the config defines no stages")
    inits = [s.init for s in stages if s.init]
    if "text_encoder" not in data and inits:  # the init model's encoder (IF: its T5)
        te = encoder_config(read_index(init_stage_dir(inits[0]).parent)["text_encoder"])
    return CascadeRunConfig(te, dc, stages)


def init_stage_dir(init: str) -> Path:
    """The stage directory an ``init`` names: MODEL_DIR (its stage 0) or MODEL_DIR:K."""
    root, _, k = init.rpartition(":") if re.fullmatch(r".*:\d+", init) else (init, "", "0")
    index = read_index(root)
    if int(k) >= len(index["stages"]):
        raise ValueError(f"init {init}: {root} has {len(index['stages'])} stage(s)")
    return Path(root) / index["stages"][int(k)]


def _check_stage_entry(i: int, entry: Any) -> None:
    """Raise unless stage entry ``i`` is a mapping of known keys of the right kinds."""
    if not isinstance(entry, dict):
        raise ValueError(
            f"stages[{i}]: expected a mapping (preset, stage, train, data, init), "
            f"got {show_value(entry)}"
        )
    extra = set(map(str, entry)) - {"preset", "stage", "train", "data", "init"}
    if extra:
        raise ValueError(f"stage {i}: unknown key(s) {', '.join(sorted(extra))}")
    if "preset" in entry and "init" in entry:
        raise ValueError(f"stage {i}: give a preset or an init model, not both")
    if "preset" in entry and not isinstance(entry["preset"], str):
        raise ValueError(
            f"stages[{i}].preset: expected a preset name, got {show_value(entry['preset'])}"
        )
    if entry.get("init") is not None and not isinstance(entry["init"], str):
        raise ValueError(f"stage {i}: init must be MODEL_DIR or MODEL_DIR:K")
    for key in ("stage", "train", "data"):
        if entry.get(key) is not None and not isinstance(entry[key], dict):
            raise ValueError(f"stages[{i}].{key}: expected a mapping, got {show_value(entry[key])}")


def load_cascade_config(path: str | Path) -> CascadeRunConfig:
    """Read and resolve a cascade config file."""
    return parse_cascade_config(read_config_file(path))
