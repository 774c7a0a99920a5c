"""``imagen import``'s checks of the Stable Diffusion x4 upscaler's parts, before anything of
them is used (as pipeline/import_checks.py checks DeepFloyd IF's): the U-Net against the
U-Net range table, the VAE and the CLIP text model built on the meta device with their
weights' headers compared to them (safetensors only), the tokenizer folder, and the CLIP
width the U-Net takes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from imagen.models import validate
from imagen.models.config_ranges import MAX_LEVELS, check_unet_2d_condition
from imagen.models.limits import MAX_WIDTH, check_range
from imagen.pipeline import import_checks
from imagen.pipeline.import_checks import Component, check_component, read_config, regular_file

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
# diffusers renamed the VAE's attention parameters; older files still use the old names
OLD_ATTENTION = {
    ".query.": ".to_q.",
    ".key.": ".to_k.",
    ".value.": ".to_v.",
    ".proj_attn.": ".to_out.0.",
}


def new_name(name: str) -> str:
    """A VAE tensor's name as diffusers now calls it."""
    if "attentions" in name:
        for old, new in OLD_ATTENTION.items():
            name = name.replace(old, new)
    return name


def _check_vae(config: dict[str, Any], source: str) -> None:
    widths = config.get("block_out_channels")
    if not isinstance(widths, list) or not 1 <= len(widths) <= MAX_LEVELS:
        raise ValueError(f"{source}: block_out_channels must list 1 to {MAX_LEVELS} widths")
    if not all(isinstance(w, int) and not isinstance(w, bool) for w in widths):
        raise ValueError(f"{source}: block_out_channels must be integers")
    check_range(source, "block_out_channels", widths, 1, MAX_WIDTH)
    for key, high in (("latent_channels", 64), ("in_channels", 64), ("out_channels", 64)):
        value = config.get(key, 3)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{source}: {key} must be an integer, got {value!r}")
        check_range(source, key, value, 1, high)
    layers = config.get("layers_per_block", 1)
    if isinstance(layers, bool) or not isinstance(layers, int):
        raise ValueError(f"{source}: layers_per_block must be an integer")
    check_range(source, "layers_per_block", layers, 1, 16)


def _check_clip(config: dict[str, Any], source: str) -> None:
    sizes = {"hidden_size": MAX_WIDTH, "intermediate_size": 4 * MAX_WIDTH,
             "num_hidden_layers": 64, "num_attention_heads": 256,
             "max_position_embeddings": 4096, "vocab_size": 1 << 20}  # fmt: skip
    for key, high in sizes.items():
        value = config.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{source}: {key} must be an integer, got {value!r}")
        check_range(source, key, value, 1, high)


def _vae(config: dict[str, Any]) -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")})


def _clip(config: dict[str, Any]) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig.from_dict(config))


UNET = Component("x4 U-Net", check_unet_2d_condition, import_checks.UNET.build, WEIGHTS)
VAE = Component("VAE", _check_vae, _vae, WEIGHTS)
CLIP = Component("CLIP text model", _check_clip, _clip, ("model.safetensors",))


def check_vae(folder: Path, within: Path, names: tuple[str, ...]) -> Path:
    """The VAE's config and weights (old attention names allowed: they are renamed)."""
    config = read_config(folder / "config.json", within)
    _check_vae(config, str(folder / "config.json"))
    (path,) = import_checks.weight_files(folder, names, within)
    module = import_checks.build_on_meta(VAE, config, folder / "config.json")
    header = {new_name(k): v for k, v in validate.read_header(path).items()}
    problem = validate.tensor_mismatch(validate.expected_tensors(module.state_dict()), header)
    if problem:
        raise ValueError(f"{path} does not fit the VAE of its config.json: {problem}")
    return path


def check_x4(root: Path, variant: str | None) -> tuple[Path, Path]:
    """Check every part of the upscaler at ``root``; returns its U-Net and VAE weights files."""
    within = import_checks.trusted_root(root)
    names = WEIGHTS if variant is None else (f"diffusion_pytorch_model.{variant}.safetensors",)
    unet = check_component(root / "unet", UNET, within, names)
    vae = check_vae(root / "vae", within, names)
    clip = check_component(root / "text_encoder", CLIP, within)
    tokenizer = root / "tokenizer"
    if not tokenizer.is_dir():
        raise FileNotFoundError(f"{root} has no tokenizer/ (the x4 upscaler's CLIP tokenizer)")
    for p in sorted(tokenizer.iterdir()):
        regular_file(p, within)
        if p.suffix == ".json":
            read_config(p, within, max_bytes=64 << 20, max_nodes=4_000_000)
    if not any((tokenizer / n).is_file() for n in ("vocab.json", "tokenizer.json")):
        raise ValueError(f"{tokenizer} holds no CLIP vocabulary (vocab.json or tokenizer.json)")
    width = unet.config.get("cross_attention_dim")
    if width != clip.config.get("hidden_size"):
        raise ValueError(
            f"{clip.config_path}: the CLIP text model is {clip.config.get('hidden_size')} wide, "
            f"but the U-Net takes text {width} wide"
        )
    return unet.weights[0], vae
