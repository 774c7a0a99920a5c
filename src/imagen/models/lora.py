"""LoRA adapters on a stage's network, through PEFT: reading LoRA files (diffusers' layout,
``unet.<module>.lora_A.weight`` / ``lora_B.weight``, safetensors only), checking that they fit
a network, applying them (with a scale, several at once, fused or not), and writing them.

A file is checked before a tensor is read: its name (a pickle ``.bin`` or ``.pt`` is refused,
never unpickled), its size, then its safetensors header (every entry a float tensor whose
bytes lie inside the file), then each adapted module against the network (the first layer
the file names that the network lacks, or whose shape differs, is the one-line error). A
stage with a learned variance samples with the fixed posterior variance while a LoRA is
applied: LoRAs are trained on the prediction alone, as diffusers' README tells IF users
(``variance_type="fixed_small"``). PEFT is imported only when an adapter is made.
"""

from __future__ import annotations

import itertools
import json
import struct
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from imagen.models.lora_spec import LORA_WEIGHT_NAME, PICKLE_SUFFIXES, LoraSpec
from imagen.models.stage import Stage
from imagen.models.stage_config import fine_tuned_config

if TYPE_CHECKING:
    from imagen.models.cascade import Cascade

MAX_LORA_BYTES = 4 << 30  # far above any LoRA (IF-I-XL at rank 128 is about 0.3 GB)
MAX_HEADER_BYTES = 16 << 20
MAX_LORA_TENSORS = 100_000
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
PREFIX = "unet."  # diffusers' prefix of a U-Net's LoRA keys
_NAMES = itertools.count()  # adapter names: unique, so LoRAs can be applied more than once
DIFFUSERS_METADATA = "lora_adapter_metadata"  # diffusers' LoraConfig record in the header
IMAGEN_METADATA = "imagen"  # this project's record (stage, rank, alpha, base) in the header
CONFIG_KEYS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora")


@dataclass
class LoraFile:
    """A LoRA file whose header passed the checks: per adapted module the shapes of its
    ``lora_A`` and ``lora_B`` weights (keys without ``unet.``), diffusers' adapter metadata
    and this project's record (both {} when absent)."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    converted: bool = False  # an older diffusers layout, renamed to PEFT's

    @property
    def modules(self) -> list[str]:
        return sorted({k.split(".lora_", 1)[0] for k in self.shapes})

    def tensors(self) -> dict[str, Tensor]:
        """The adapter's tensors (PEFT's keys, float32)."""
        from safetensors.torch import load_file

        state = {k.removeprefix(PREFIX): v.float() for k, v in load_file(str(self.path)).items()}
        return _peft_keys(state) if self.converted else state


def lora_path(path: str | Path) -> Path:
    """The LoRA file of ``path``: a ``.safetensors`` file, or a folder holding
    ``pytorch_lora_weights.safetensors`` (or one ``.safetensors`` file). A pickle file is
    refused by name, and one without a safetensors header by its first bytes: never unpickled."""
    p = Path(path).expanduser()
    if p.is_dir():
        found = [p / LORA_WEIGHT_NAME] if (p / LORA_WEIGHT_NAME).is_file() else []
        found = found or sorted(p.glob("*.safetensors"))
        if len(found) != 1:
            pickles = [f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES]
            why = (
                f"only pickle files ({', '.join(pickles)}), which are never loaded"
                if pickles
                else (f"{len(found)} .safetensors files" if found else "no .safetensors file")
            )
            raise ValueError(f"LoRA folder {p} holds {why}; name the {LORA_WEIGHT_NAME} file")
        p = found[0]
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"LoRA {p} is a pickle file; LoRA files must be .safetensors (never unpickled)"
        )
    if not p.is_file():
        raise FileNotFoundError(f"LoRA file not found: {p}")
    return p


def _not_safetensors(head: bytes) -> str:
    """What a file that does not start as a safetensors file looks like (never unpickled)."""
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"):
        return "is a pickle (torch.save) file, refused: LoRA files must be safetensors"
    return "is not a safetensors file (no safetensors header)"


def _read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, after checking its size and framing."""
    size = path.stat().st_size
    if size > MAX_LORA_BYTES:
        raise ValueError(
            f"LoRA {path} is {size / 2**30:.1f} GiB, over the {MAX_LORA_BYTES >> 30} GiB limit"
        )
    with open(path, "rb") as f:
        head = f.read(9)
        n = struct.unpack("<Q", head[:8])[0] if len(head) == 9 else 0
        if not (2 <= n <= min(MAX_HEADER_BYTES, size - 8) and head[8:9] == b"{"):
            raise ValueError(f"LoRA {path} {_not_safetensors(head)}")
        raw = head[8:] + f.read(n - 1)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(
            f"LoRA {path} is not a safetensors file (its header is not JSON)"
        ) from None
    if not isinstance(header, dict) or len(header) > MAX_LORA_TENSORS:
        raise ValueError(f"LoRA {path}: its safetensors header is not a table of tensors")
    _check_entries(path, header, size - 8 - n)
    return header


def _check_entries(path: Path, header: dict[str, Any], data_bytes: int) -> None:
    """Every tensor a float tensor whose bytes lie inside the file."""
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        ok = isinstance(entry, dict) and entry.get("dtype") in FLOAT_DTYPES
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
        ok = ok and isinstance(offsets, list) and len(offsets) == 2
        if ok:
            begin, end = offsets
            numel = 1
            for d in shape:
                numel *= d
            ok = (
                0 <= begin <= end <= data_bytes
                and end - begin == numel * FLOAT_DTYPES[entry["dtype"]]
            )
        if not ok:
            raise ValueError(f"LoRA {path}: tensor {key} is not a float tensor inside the file")


def _metadata(path: Path, header: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(diffusers' adapter metadata for the U-Net, unprefixed; this project's record)."""
    meta = header.get("__metadata__") or {}
    out = []
    for key in (DIFFUSERS_METADATA, IMAGEN_METADATA):
        try:
            value = json.loads(meta.get(key) or "{}") if isinstance(meta, dict) else {}
        except json.JSONDecodeError:
            raise ValueError(f"LoRA {path}: its {key} metadata is not JSON") from None
        out.append(value if isinstance(value, dict) else {})
    diffusers = {k.removeprefix(PREFIX): v for k, v in out[0].items() if k.startswith(PREFIX)}
    return diffusers, out[1]


def read_lora(path: str | Path) -> LoraFile:
    """Open a LoRA file (see :func:`lora_path`) and check its header; no tensor is read."""
    p = lora_path(path)
    header = _read_header(p)
    keys = [k for k in header if k != "__metadata__"]
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        raise ValueError(
            f"LoRA {p} is in kohya's layout (lora_unet_...); convert it to diffusers' first"
        )
    if any(k.startswith("text_encoder") for k in keys):
        raise ValueError(f"LoRA {p} also adapts the text encoder, which imagen does not support")
    if any("lora_magnitude_vector" in k or "dora_scale" in k for k in keys):
        raise ValueError(f"LoRA {p} is a DoRA adapter, which imagen does not support")
    shapes = {k.removeprefix(PREFIX): tuple(header[k]["shape"]) for k in keys}
    converted = bool(shapes) and ".lora_A." not in next(iter(shapes))
    if converted:
        shapes = _peft_keys(shapes)
    bad = [
        k for k in shapes if not k.endswith((".lora_A.weight", ".lora_B.weight", ".lora_B.bias"))
    ]
    if not shapes or bad:
        what = f"tensor {bad[0]}, which is not a LoRA weight" if bad else "no tensors"
        raise ValueError(f"LoRA {p} holds {what}")
    metadata, record = _metadata(p, header)
    return LoraFile(p, shapes, metadata, record, converted)


def _peft_keys(state: dict[str, Any]) -> dict[str, Any]:
    """Older diffusers layouts (``lora.down``/``lora.up``, attention processors) in PEFT's."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    return convert_unet_state_dict_to_peft(dict(state))


# ---- fitting a network -------------------------------------------------------------------
def _base(module: nn.Module) -> nn.Module:
    get = getattr(module, "get_base_layer", None)
    return get() if callable(get) else module


def _expected(module: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The shapes of lora_A and lora_B for ``module`` at ``rank`` (None: not adaptable)."""
    if isinstance(module, nn.Linear):
        return (rank, module.in_features), (module.out_features, rank)
    if isinstance(module, nn.Conv2d):
        return (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
    return None


def check_fits(network: nn.Module, lora: LoraFile, where: str) -> None:
    """Raise one line naming the first LoRA weight that does not fit ``network`` (a module
    it lacks, one LoRA cannot adapt, or a shape that differs)."""
    modules = dict(network.named_modules())
    for name in lora.modules:
        a, b = (lora.shapes.get(f"{name}.lora_{x}.weight") for x in "AB")
        head = f"LoRA {lora.path} does not fit {where}"
        if a is None or b is None:
            raise ValueError(
                f"{head}: {name} has lora_{'B' if a is None else 'A'} but not lora_{'A' if a is None else 'B'}"
            )
        if name not in modules:
            raise ValueError(f"{head}: it adapts {name}, which the network does not have")
        want = _expected(_base(modules[name]), a[0])
        if want is None:
            raise ValueError(
                f"{head}: {name} is a {type(modules[name]).__name__}, which LoRA cannot adapt"
            )
        for x, got, need in (("A", a, want[0]), ("B", b, want[1])):
            if tuple(got) != tuple(need):
                raise ValueError(
                    f"{head}: {name}.lora_{x}.weight has shape {list(got)}, the layer needs {list(need)}"
                )


def lora_config(lora: LoraFile) -> Any:
    """PEFT's LoraConfig of a file: the ranks from its shapes, alpha from diffusers' metadata
    where given (else the rank: scale 1, diffusers' convention), its modules as targets."""
    from peft import LoraConfig

    ranks = {m: lora.shapes[f"{m}.lora_A.weight"][0] for m in lora.modules}
    r = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {m: v for m, v in ranks.items() if v != r}
    given = {k: lora.metadata[k] for k in CONFIG_KEYS if k in lora.metadata}
    kwargs: dict[str, Any] = {
        "r": r,
        "lora_alpha": r,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
    }
    kwargs.update(given)
    try:
        return LoraConfig(
            **kwargs,
            target_modules=lora.modules,
            lora_bias=any(k.endswith("lora_B.bias") for k in lora.shapes),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"LoRA {lora.path}: its metadata is not a LoRA configuration ({e})"
        ) from None


# ---- adapters on a network ---------------------------------------------------------------
def tuner_layers(network: nn.Module) -> list[tuple[str, Any]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in network.named_modules() if isinstance(m, BaseTunerLayer)]


def add_adapter(
    network: nn.Module, name: str, config: Any, state: dict[str, Tensor] | None = None
) -> None:
    """Inject adapter ``name`` (float32 weights, whatever the base's dtype) and load ``state``
    (PEFT's keys without the adapter name) into it, strictly."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import cast_adapter_dtype

    with warnings.catch_warnings():  # a second adapter is meant: several LoRAs, or the EMA's
        warnings.filterwarnings("ignore", "Already found a `peft_config`")
        inject_adapter_in_model(config, network, adapter_name=name)
    cast_adapter_dtype(network, name)
    if state is None:
        return
    result = set_peft_model_state_dict(network, state, adapter_name=name)
    unexpected = [k for k in result.unexpected_keys if ".lora_" in k]
    if unexpected:
        raise ValueError(f"LoRA weight {unexpected[0]} matches no adapted layer")


def set_active(
    network: nn.Module, names: list[str], scales: dict[str, float] | None = None
) -> None:
    """Make adapters ``names`` the active ones (each at its scale times alpha / rank)."""
    for _, layer in tuner_layers(network):
        layer.set_adapter(names, inference_mode=not network.training)
        for name, scale in (scales or {}).items():
            layer.set_scale(name, scale)


def unload(network: nn.Module, merge: bool, names: list[str] | None = None) -> None:
    """Replace every adapted layer by its base layer; with ``merge`` the adapters ``names``
    are first merged into the base weights (PEFT's merge, computed in float32)."""
    from peft.utils import _get_submodules

    for name, layer in tuner_layers(network):
        if merge:
            layer.merge(safe_merge=True, adapter_names=names)
        parent, _, attr = _get_submodules(network, name)
        setattr(parent, attr, layer.get_base_layer())


def adapter_state(network: nn.Module, name: str) -> dict[str, Tensor]:
    """The weights of adapter ``name`` with PEFT's keys (no adapter name in them)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(network, adapter_name=name)


@dataclass
class Adapter:
    """A loaded LoRA: its PEFT config, tensors and scale."""

    name: str
    config: Any
    state: dict[str, Tensor]
    scale: float = 1.0
    source: str = ""


def attach(network: nn.Module, adapters: list[Adapter], fuse: bool = False) -> None:
    """Add ``adapters`` to ``network``, all active at their scales; ``fuse`` merges them
    into the base weights and leaves plain layers (faster; bf16 weights round the merge)."""
    for a in adapters:
        add_adapter(network, a.name, a.config, a.state)
    names = sorted({n for _, layer in tuner_layers(network) for n in layer.lora_A})  # all of them
    set_active(network, names, {a.name: a.scale for a in adapters})
    if fuse:
        unload(network, merge=True, names=names)


def _low_memory_loader(adapters: list[Adapter], fuse: bool) -> Any:
    """How a low-memory cascade loads a stage with adapters: the plain network takes the
    weights, then the adapters are attached again (each time the stage is loaded)."""

    def load(network: nn.Module, state: dict[str, Tensor]) -> None:
        unload(network, merge=False)
        network.load_state_dict(state, strict=True, assign=True)
        attach(network, adapters, fuse)

    load.adapters = adapters  # type: ignore[attr-defined]
    return load


def apply_loras(
    cascade: Cascade, specs: list[LoraSpec | str | tuple], fuse: bool = False
) -> list[dict[str, Any]]:
    """Apply LoRA files to a cascade's stages (each spec's stage, else the stage its file
    records, else 0); all files are checked before any is applied. Returns a record per
    file (path, stage, scale, rank). A stage with a learned variance then samples with the
    fixed posterior variance."""
    loaded: dict[int, list[Adapter]] = {}
    records = []
    for item in specs:
        spec = LoraSpec.of(item)
        lora = read_lora(spec.path)
        k = spec.stage if spec.stage is not None else int(lora.record.get("stage", 0))
        if not 0 <= k < len(cascade.stages):
            raise ValueError(
                f"LoRA {lora.path}: stage {k}, but the model has {len(cascade.stages)} stage(s)"
            )
        check_fits(cascade.stages[k].unet, lora, f"stage {k}")
        config = lora_config(lora)
        adapter = Adapter(f"lora{next(_NAMES)}", config, {}, spec.scale, str(lora.path))
        loaded.setdefault(k, []).append(adapter)
        records.append({"path": str(lora.path), "stage": k, "scale": spec.scale, "rank": config.r})
    for k, adapters in loaded.items():
        for a in adapters:
            a.state = read_lora(a.source).tensors()
        stage = cascade.stages[k]
        stage.config = fine_tuned_config(stage.config)  # the fixed posterior variance
        if cascade.low_memory is not None:
            earlier = getattr(cascade.low_memory.loaders.get(k), "adapters", [])
            cascade.low_memory.loaders[k] = _low_memory_loader(earlier + adapters, fuse)
            stage.unet.to("meta")  # loaded with its adapters when it next samples
        else:
            attach(stage.unet, adapters, fuse)
    return records


def merged_state(
    stage: Stage, config: Any, state: dict[str, Tensor], scale: float = 1.0
) -> dict[str, Tensor]:
    """The state dict of ``stage``'s network with the adapter merged in (the stage is left
    with plain, merged layers)."""
    attach(stage.unet, [Adapter("merged", config, state, scale)], fuse=True)
    return stage.unet.state_dict()


# ---- writing -----------------------------------------------------------------------------
def file_tensors(state: dict[str, Tensor], rank: int, alpha: float) -> dict[str, Tensor]:
    """An adapter's weights as a LoRA file holds them: ``unet.``-prefixed keys, and the
    scale alpha / rank folded into lora_B, so every loader (diffusers with or without
    metadata, this project) applies it at scale 1."""
    factor = alpha / rank
    out = {}
    for k, v in state.items():
        v = v.detach().float().cpu()
        out[PREFIX + k] = v * factor if factor != 1 and ".lora_B." in k else v
    return out


def save_lora(
    path: Path, state: dict[str, Tensor], rank: int, alpha: float, record: dict[str, Any]
) -> None:
    """Write a LoRA file in diffusers' layout (see :func:`file_tensors`) with diffusers'
    adapter metadata (rank, alpha = rank after folding, target modules) and ``record``."""
    from safetensors.torch import save_file

    tensors = file_tensors(state, rank, alpha)
    modules = sorted({k.removeprefix(PREFIX).split(".lora_", 1)[0] for k in tensors})
    meta = {f"{PREFIX}r": rank, f"{PREFIX}lora_alpha": rank, f"{PREFIX}target_modules": modules}
    metadata = {
        "format": "pt",
        DIFFUSERS_METADATA: json.dumps(meta, sort_keys=True),
        IMAGEN_METADATA: json.dumps(record, sort_keys=True),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def lora_settings_config(rank: int, alpha: float, dropout: float, targets: list[str]) -> Any:
    """PEFT's LoraConfig for training an adapter."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
