"""Range tables for the configs of networks from elsewhere (diffusers and transformers
components: a U-Net, a T5 encoder, a scheduler), checked before anything is built from them.

A ``config.json`` downloaded with a pipeline is untrusted: a width of a million, 100,000 layers
per block or zero norm groups would cost hours, terabytes or a crash deep inside the library.
Each table gives every field's type (int, float, bool, text, or a list of those) and its
bounds: far above any published model (DeepFloyd IF-I-XL is 2816 wide with 3 layers per
block; T5-XXL is 4096 wide with 24 layers), low enough that building the network on the meta
device stays cheap. A value out of its range is a one-line ``ValueError`` naming the file and
the field. Torch-free: the tables are read when a stage config is parsed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from imagen.models.limits import MAX_IMAGE_SIZE, MAX_WIDTH  # the project's own U-Net's too

MAX_LEVELS = 8  # down (and up) blocks of a diffusers U-Net; IF and SD have 4
MAX_LAYERS = 16  # layers per block; IF has 3, SD 2
MAX_TRANSFORMER_LAYERS = 32  # transformer layers per block; SDXL has 10
MAX_LIST = 64  # items in any list-valued field
MAX_TEXT = 200  # characters of a text field (a block or activation name)


@dataclass(frozen=True)
class Field:
    """The type and bounds of one config field: ``kind`` is int, float, bool, str or any;
    ``lists`` is how deeply it may nest in lists (0: a plain value); ``null``: None allowed."""

    kind: str
    low: float | None = None
    high: float | None = None
    lists: int = 0
    null: bool = False

    def describe(self) -> str:
        what = {"int": "an integer", "float": "a number", "bool": "true or false"}
        text = what.get(self.kind, "text")
        if self.low is not None and self.high is not None:
            text += f" in [{_num(self.low)}, {_num(self.high)}]"
        if self.lists:
            text += " (or a list of them)"
        return text + (" or null" if self.null else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def Int(low: float, high: float, lists: int = 0, null: bool = False) -> Field:  # noqa: N802
    """An integer field in [low, high]."""
    return Field("int", low, high, lists, null)


def Num(low: float, high: float, lists: int = 0, null: bool = False) -> Field:  # noqa: N802
    """A finite number in [low, high]."""
    return Field("float", low, high, lists, null)


def Bool(lists: int = 0, null: bool = False) -> Field:  # noqa: N802
    return Field("bool", lists=lists, null=null)


def Text(lists: int = 0, null: bool = False) -> Field:  # noqa: N802
    return Field("str", lists=lists, null=null)


def _scalar_ok(value: Any, f: Field) -> bool:
    if f.kind == "any":
        return True
    if f.kind == "bool":
        return isinstance(value, bool)
    if f.kind == "str":
        return isinstance(value, str) and len(value) <= MAX_TEXT
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if f.kind == "int" and not isinstance(value, int):
        return False
    if not math.isfinite(value):
        return False
    return (f.low is None or value >= f.low) and (f.high is None or value <= f.high)


def _value_ok(value: Any, f: Field, lists: int) -> bool:
    if f.kind == "any":
        return True
    if value is None:
        return f.null
    if isinstance(value, list | tuple):
        return (
            lists > 0 and len(value) <= MAX_LIST and all(_value_ok(v, f, lists - 1) for v in value)
        )
    return _scalar_ok(value, f)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_record(record: Any, table: dict[str, Field], source: str, closed: bool = True) -> None:
    """Raise a one-line ValueError (naming ``source`` and the field) unless every field of
    ``record`` that ``table`` lists has its type and range; a field the table does not list
    is refused when ``closed`` (the class would not take it), ignored otherwise. Fields whose
    names start with ``_`` (diffusers' ``_class_name``) are records, not arguments."""
    if not isinstance(record, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(str(k) for k in record if not str(k).startswith("_") and k not in table)
    if closed and unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise ValueError(f"{source}: unknown field(s) {shown}")
    for key, f in table.items():
        if key in record and not _value_ok(record[key], f, f.lists):
            raise ValueError(f"{source}: {key} must be {f.describe()}, got {_show(record[key])}")


# ---- diffusers' UNet2DConditionModel (DeepFloyd IF, Stable Diffusion) -------------------------
_W = Int(1, MAX_WIDTH)
UNET_2D_CONDITION: dict[str, Field] = {
    "sample_size": Int(1, MAX_IMAGE_SIZE, lists=1),
    "in_channels": Int(1, 64),
    "out_channels": Int(1, 64),
    "center_input_sample": Bool(),
    "flip_sin_to_cos": Bool(),
    "freq_shift": Num(-1e4, 1e4),
    "down_block_types": Text(lists=1),
    "mid_block_type": Text(null=True),
    "up_block_types": Text(lists=1),
    "only_cross_attention": Bool(lists=1),
    "block_out_channels": Int(1, MAX_WIDTH, lists=1),
    "layers_per_block": Int(1, MAX_LAYERS, lists=1),
    "downsample_padding": Int(0, 16),
    "mid_block_scale_factor": Num(0, 1e3),
    "dropout": Num(0, 0.999),
    "act_fn": Text(),
    "norm_num_groups": Int(1, MAX_WIDTH, null=True),
    "norm_eps": Num(1e-12, 1.0),
    "cross_attention_dim": Int(1, MAX_WIDTH, lists=1),
    "transformer_layers_per_block": Int(1, MAX_TRANSFORMER_LAYERS, lists=2),
    "reverse_transformer_layers_per_block": Int(1, MAX_TRANSFORMER_LAYERS, lists=2, null=True),
    "encoder_hid_dim": Int(1, MAX_WIDTH, null=True),
    "encoder_hid_dim_type": Text(null=True),
    "attention_head_dim": Int(1, MAX_WIDTH, lists=1),
    "num_attention_heads": Int(1, 1024, lists=1, null=True),
    "dual_cross_attention": Bool(),
    "use_linear_projection": Bool(),
    "class_embed_type": Text(null=True),
    "addition_embed_type": Text(null=True),
    "addition_time_embed_dim": Int(1, MAX_WIDTH, null=True),
    "num_class_embeds": Int(1, 100_000, null=True),
    "upcast_attention": Bool(),
    "resnet_time_scale_shift": Text(),
    "resnet_skip_time_act": Bool(),
    "resnet_out_scale_factor": Num(1e-6, 1e3),
    "time_embedding_type": Text(),
    "time_embedding_dim": Int(1, 4 * MAX_WIDTH, null=True),
    "time_embedding_act_fn": Text(null=True),
    "timestep_post_act": Text(null=True),
    "time_cond_proj_dim": Int(1, MAX_WIDTH, null=True),
    "conv_in_kernel": Int(1, 15),
    "conv_out_kernel": Int(1, 15),
    "projection_class_embeddings_input_dim": Int(1, 4 * MAX_WIDTH, null=True),
    "attention_type": Text(),
    "class_embeddings_concat": Bool(),
    "mid_block_only_cross_attention": Bool(null=True),
    "cross_attention_norm": Text(null=True),
    "addition_embed_type_num_heads": Int(1, 1024),
}
"""Every argument of ``UNet2DConditionModel`` (tests/test_reliability_import.py checks the
table against the installed diffusers), with its type and bounds."""


def check_unet_2d_condition(record: Any, source: str) -> None:
    """A diffusers ``UNet2DConditionModel`` config checked field by field and as a whole: as
    many up blocks and widths as down blocks (at most :data:`MAX_LEVELS`), every width a
    multiple of ``norm_num_groups``."""
    check_record(record, UNET_2D_CONDITION, source)
    down = record.get("down_block_types", [None] * 4)  # diffusers' defaults: 4 levels
    down = down if isinstance(down, list) else [down]
    if not 1 <= len(down) <= MAX_LEVELS:
        raise ValueError(f"{source}: down_block_types must list 1 to {MAX_LEVELS} blocks")
    up = record.get("up_block_types", down)
    widths = record.get("block_out_channels", [320, 640, 1280, 1280][: len(down)])
    for name, value in (("up_block_types", up), ("block_out_channels", widths)):
        if not isinstance(value, list) or len(value) != len(down):
            raise ValueError(
                f"{source}: {name} must list one entry per down block ({len(down)}), got "
                f"{_show(value)}"
            )
    groups = record.get("norm_num_groups", 32)
    if groups is not None and any(w % groups for w in widths):
        raise ValueError(
            f"{source}: every block_out_channels entry must be a multiple of norm_num_groups "
            f"({groups}), got {widths}"
        )


# ---- transformers' T5 encoder ------------------------------------------------------------
T5_ENCODER: dict[str, Field] = {
    "vocab_size": Int(1, 1_000_000),
    "d_model": Int(1, MAX_WIDTH),
    "d_kv": Int(1, MAX_WIDTH),
    "d_ff": Int(1, 8 * MAX_WIDTH),
    "num_layers": Int(1, 128),
    "num_decoder_layers": Int(0, 128, null=True),
    "num_heads": Int(1, 1024),
    "relative_attention_num_buckets": Int(1, 4096),
    "relative_attention_max_distance": Int(1, 1_000_000),
    "dropout_rate": Num(0, 1),
    "classifier_dropout": Num(0, 1),
    "layer_norm_epsilon": Num(1e-12, 1),
    "initializer_factor": Num(0, 1e3),
    "feed_forward_proj": Text(),
    "dense_act_fn": Text(),
    "is_gated_act": Bool(),
    "is_encoder_decoder": Bool(),
    "use_cache": Bool(),
    "tie_word_embeddings": Bool(),
    "pad_token_id": Int(0, 1_000_000, null=True),
    "eos_token_id": Int(0, 1_000_000, lists=1, null=True),
    "decoder_start_token_id": Int(0, 1_000_000, null=True),
    "model_type": Text(),
    "architectures": Text(lists=1, null=True),
}
"""The fields of a T5 ``config.json`` that size the encoder (others are transformers'
generic settings, bounded by the JSON reader)."""

T5_MODEL_TYPES = ("t5", "mt5")


def check_t5_encoder(record: Any, source: str) -> None:
    """A T5 encoder config checked: its sizes, and a model type T5EncoderModel reads."""
    check_record(record, T5_ENCODER, source, closed=False)
    kind = record.get("model_type", "t5")
    if kind not in T5_MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type {kind!r} is not a T5 encoder ({', '.join(T5_MODEL_TYPES)})"
        )


# ---- diffusers' DDPM scheduler -----------------------------------------------------------
DDPM_SCHEDULER: dict[str, Field] = {
    "num_train_timesteps": Int(2, 100_000),
    "beta_start": Num(0, 1),
    "beta_end": Num(0, 1),
    "beta_schedule": Text(),
    "trained_betas": Field("any", null=True),  # a schedule of its own: imports refuse one
    "variance_type": Text(null=True),
    "clip_sample": Bool(),
    "clip_sample_range": Num(0, 1e6),
    "prediction_type": Text(),
    "thresholding": Bool(),
    "dynamic_thresholding_ratio": Num(1e-6, 1),
    "sample_max_value": Num(1, 1e6),
    "timestep_spacing": Text(),
    "steps_offset": Int(0, 100_000),
    "rescale_betas_zero_snr": Bool(),
}
"""The fields of a ``scheduler_config.json`` imagen reads or that change the schedule."""
