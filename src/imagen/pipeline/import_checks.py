"""Checks of a downloaded diffusers pipeline folder, before ``imagen import`` links, copies or
loads any of it (pipeline/diffusers_import.py calls them).

A pipeline folder is untrusted, as a model directory is (models/validate.py). Every file read
must be a regular file inside the folder (a symlink may point into the Hugging Face cache
folder of the same repo, where the Hub keeps the blobs, and nowhere else: not ``/etc/passwd``,
not a device); every JSON file is read with the bounded reader (utils/config.py) and each
network's config checked against its kind's ranges (models/config_ranges.py); weights are
safetensors only (a pickle is refused by its name and never opened, since loading one can run
code), and their headers must hold exactly the tensors of the network the config describes,
built on the meta device. :class:`Component` describes one part (a config, weights, the
network class), so every part of every pipeline kind (IF's U-Net and T5; an upscaler's U-Net,
VAE or CLIP) is checked by the same :func:`check_component`. Every failure is one line
(``ValueError`` or ``FileNotFoundError``) naming the file.
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imagen.models import validate
from imagen.models.config_ranges import (
    DDPM_SCHEDULER,
    check_record,
    check_t5_encoder,
    check_unet_2d_condition,
)
from imagen.utils.config import load_json_file

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
TOKENIZER_JSON_BYTES = 64 << 20  # a tokenizer.json holds the vocabulary (T5's: 2.4 MB)
TOKENIZER_JSON_VALUES = 5_000_000


# ---- files -------------------------------------------------------------------------------
def trusted_root(folder: Path) -> Path:
    """The folder whose files a pipeline folder's files may resolve into: the folder itself,
    or, for a snapshot in the Hugging Face cache (``models--ORG--NAME/snapshots/REV``), the
    repo's cache folder, whose ``blobs/`` the snapshot's symlinks point to."""
    folder = Path(folder).absolute()
    for p in (folder, *folder.parents):
        if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
            return p.parent.parent
    return folder


def regular_file(path: Path, within: Path) -> Path:
    """``path``, checked to be a regular file (after symlinks) that resolves inside
    ``within``; FileNotFoundError when it is absent, ValueError otherwise."""
    if not path.exists():
        if path.is_symlink():
            raise ValueError(f"{path} is a symlink to {path.readlink()}, which does not exist")
        raise FileNotFoundError(f"{path} does not exist")
    real = path.resolve()
    if not real.is_relative_to(within.resolve()):
        raise ValueError(
            f"{path} leads outside the pipeline folder {within} (to {real}); imagen import "
            f"reads only files inside it"
        )
    if not stat.S_ISREG(real.stat().st_mode):
        raise ValueError(f"{path} is not a regular file")
    return path


def read_config(path: Path, within: Path | None = None, **limits: int) -> dict[str, Any]:
    """A JSON object file of a pipeline folder, read with the bounded reader (``limits``:
    ``max_bytes``, ``max_nodes`` for larger files); ``within`` defaults to the trusted root
    of the file's folder."""
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"{path.parent} is not a diffusers pipeline part (no {path.name})")
    regular_file(path, within or trusted_root(path.parent))
    data = load_json_file(path, path.name, **limits)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


# what diffusers' DDPMScheduler assumes for a field its config leaves out: a missing
# beta_schedule is linear there, not IF's cosine, so it is read as diffusers would read it
DDPM_DEFAULTS = {
    "beta_schedule": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "variance_type": "fixed_small",
}


def read_scheduler(path: Path, within: Path) -> dict[str, Any]:
    """A ``scheduler_config.json``, its fields type- and range-checked."""
    cfg = read_config(path, within)
    check_record(cfg, DDPM_SCHEDULER, str(path), closed=False)
    if cfg.get("trained_betas") is not None:
        raise ValueError(f"{path}: trained_betas replace the schedule, which IF stages do not")
    return cfg


def _pickles(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    except OSError:
        return []


def weight_files(folder: Path, names: tuple[str, ...], within: Path) -> list[Path]:
    """The safetensors files of a part: the first of ``names`` present (a ``.index.json``
    names shards beside it), each a regular file; a folder with pickles only is refused by
    name (the pickle is never opened)."""
    for name in names:
        path = folder / name
        if not path.exists() and not path.is_symlink():
            continue
        if not name.endswith(".index.json"):
            return [regular_file(path, within)]
        weight_map = read_config(path, within).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{path}: weight_map must map tensor names to shard files")
        shards = sorted({str(v) for v in weight_map.values()})
        for shard in shards:
            if "/" in shard or "\\" in shard or not shard.endswith(".safetensors"):
                raise ValueError(f"{path}: {shard!r} is not a safetensors file beside it")
        return [regular_file(folder / s, within) for s in shards]
    pickles = _pickles(folder)
    if pickles:
        raise ValueError(
            f"{folder} has its weights only as a pickle ({pickles[0]}), which imagen never "
            f"opens (loading one can run code); convert it to safetensors where you trust it"
        )
    raise FileNotFoundError(f"{folder} has no weights file ({' or '.join(names)})")


# ---- a network part ----------------------------------------------------------------------
@dataclass(frozen=True)
class Component:
    """A diffusers or transformers pipeline part in a folder: its config file, how that is
    range-checked, the network built from it (called under the meta device: only names,
    shapes and dtypes are needed) and the names its safetensors weights may have."""

    what: str  # the part, in messages ("U-Net", "T5 text encoder")
    check_config: Callable[[dict[str, Any], str], None]
    build: Callable[[dict[str, Any]], nn.Module]
    weights: tuple[str, ...]
    config_file: str = "config.json"


@dataclass
class CheckedComponent:
    """A part that passed :func:`check_component`: its config and weights files."""

    config: dict[str, Any]
    weights: list[Path]
    config_path: Path


def build_on_meta(component: Component, config: dict[str, Any], source: Path) -> nn.Module:
    """The part's network with no storage; a config the library refuses to build from (an
    unknown block type, widths that do not divide) is a one-line ValueError."""
    try:
        with torch.device("meta"):
            return component.build(config)
    except Exception as e:  # noqa: BLE001 - the library's own refusal of untrusted input
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"{source} does not describe a {component.what} that can be built "
            f"({type(e).__name__}: {first})"
        ) from None


def expected_shapes(module: nn.Module, header: validate.Shapes) -> validate.Shapes:
    """The module's tensors (names, shapes, dtypes) as a weights file should hold them: of
    tied tensors (T5's shared and encoder embeddings), the file may hold one name only."""
    state = module.state_dict(keep_vars=True)
    expected = validate.expected_tensors(state)
    tied: dict[int, list[str]] = {}
    for name, tensor in state.items():
        tied.setdefault(id(tensor), []).append(name)
    for names in tied.values():
        if len(names) > 1 and any(n in header for n in names):
            for n in names:
                if n not in header:
                    expected.pop(n)
    return expected


def read_headers(files: list[Path]) -> validate.Shapes:
    """The tensors of one or more safetensors files (shards), from their headers alone."""
    header: validate.Shapes = {}
    for f in files:
        part = validate.read_header(f)
        again = next((k for k in part if k in header), None)
        if again is not None:
            raise ValueError(f"{f}: tensor {again} is also in another shard")
        header.update(part)
    return header


def check_component(
    folder: Path, component: Component, within: Path, weights: tuple[str, ...] | None = None
) -> CheckedComponent:
    """Check a part before anything of it is used: its config (bounded, range-checked), its
    network built on the meta device, and its weights' headers against that network
    (``weights``: the candidate file names, default the component's)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (no {component.what} there)")
    config_path = folder / component.config_file
    config = read_config(config_path, within)
    component.check_config(config, str(config_path))
    for other in sorted(folder.glob("*.json")):  # what the library may read beside it, bounded
        if other.name != component.config_file:
            read_config(other, within)
    files = weight_files(folder, weights or component.weights, within)
    module = build_on_meta(component, config, config_path)
    header = read_headers(files)
    problem = validate.tensor_mismatch(expected_shapes(module, header), header)
    if problem:
        raise ValueError(
            f"{files[0]} does not fit the network of its {config_path.name}: {problem}"
        )
    return CheckedComponent(config, files, config_path)


# ---- the parts of a DeepFloyd IF pipeline --------------------------------------------------
def _unet(config: dict[str, Any]) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})


def _t5(config: dict[str, Any]) -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config.from_dict(config))


UNET = Component(
    "U-Net",
    check_unet_2d_condition,
    _unet,
    ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"),
)
T5_ENCODER = Component(
    "T5 text encoder", check_t5_encoder, _t5, ("model.safetensors", "model.safetensors.index.json")
)


# ---- the text encoder and its tokenizer ---------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
TEST_SENTENCE = "a photograph of a red cat sitting on a blue sofa"


def check_tokenizer_folder(folder: Path, within: Path) -> None:
    """Every file of a tokenizer folder regular and inside the pipeline, its JSON bounded (a
    vocabulary may be larger than a config), and a vocabulary there at all (an empty folder
    would map every prompt to the unknown token)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no tokenizer at {folder}; pass --text-encoder DIR")
    for p in sorted(folder.iterdir()):
        if p.is_dir() and not p.is_symlink():
            continue
        regular_file(p, within)
        if p.suffix == ".json":
            read_config(p, within, max_bytes=TOKENIZER_JSON_BYTES, max_nodes=TOKENIZER_JSON_VALUES)
    if not any((folder / n).is_file() for n in TOKENIZER_FILES):
        raise ValueError(
            f"{folder} holds no tokenizer ({' or '.join(TOKENIZER_FILES)}): every prompt would "
            f"map to the unknown token"
        )


def check_text_width(encoder: CheckedComponent, widths: list[int], unets: list[Path]) -> None:
    """The T5 encoder's width must be the text width every U-Net takes."""
    d_model = encoder.config.get("d_model", 512)
    for width, unet in zip(widths, unets, strict=True):
        if width != d_model:
            raise ValueError(
                f"{encoder.config_path}: the text encoder is {d_model} wide, but the U-Net of "
                f"{unet} takes text {width} wide"
            )


def load_checked(load: Callable[[], Any], source: Path) -> Any:
    """``load()`` (the text encoder, from checked files), its failures one line: the
    library's errors on a folder that passed the checks above name the folder."""
    try:
        return load()
    except (ValueError, OSError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - a library's own refusal of untrusted files
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"{source}: the text encoder does not load ({type(e).__name__}: {first})"
        ) from None


def check_encoder_output(encoder: Any, vocab_size: int, tokenizer_dir: Path) -> None:
    """A loaded encoder is usable: its tokenizer maps a test sentence to known tokens that fit
    the encoder's vocabulary, and its embeddings of it and of "" are finite."""
    tok = getattr(encoder, "tokenizer", None)
    if tok is not None:
        ids = list(tok(TEST_SENTENCE)["input_ids"])
        special = set(tok.all_special_ids)
        pieces = tok.convert_ids_to_tokens([i for i in ids if i not in special])
        if not any(str(p).strip("\u2581 ") for p in pieces):
            raise ValueError(
                f"{tokenizer_dir}: the tokenizer maps a test sentence ({TEST_SENTENCE!r}) to "
                f"unknown tokens only (an empty vocabulary, or not this encoder's tokenizer)"
            )
        if len(tok) > vocab_size or max(ids, default=0) >= vocab_size:
            raise ValueError(
                f"{tokenizer_dir}: the tokenizer has {len(tok)} tokens, more than the text "
                f"encoder's vocabulary of {vocab_size}"
            )
    emb = encoder.encode([TEST_SENTENCE, ""])
    if not bool(torch.isfinite(emb.tokens).all()):
        raise ValueError(f"{encoder.name}: the text encoder gives non-finite embeddings")


def check_text_encoder(
    model: Path, tokenizer: Path, within: Path, widths: list[int], unets: list[Path]
) -> CheckedComponent:
    """The T5 encoder at ``model`` and its tokenizer, checked before either is loaded: the
    tokenizer's files, the encoder's config, weights and width (``widths``: the text width
    each U-Net in ``unets`` takes)."""
    check_tokenizer_folder(tokenizer, within)
    checked = check_component(model, T5_ENCODER, within)
    check_text_width(checked, widths, unets)
    return checked
