"""The Stable Diffusion x4 upscaler at its published size, with random weights, for
benchmarks/if_scale.py: its configs as its Hub repository publishes them (U-Net 473M, VAE
55M, OpenCLIP ViT-H's text tower cut to 23 layers, 340M), a diffusers pipeline folder written
tensor by tensor, the FLOPs of one network evaluation counted on the meta device, and the
evaluation script (ours against diffusers' own forward)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

X4_UNET = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[256, 512, 512, 1024],
    cross_attention_dim=1024,
    down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
    up_block_types=["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"],
    in_channels=7,
    out_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    num_class_embeds=1000,
    only_cross_attention=[True, True, True, False],
    sample_size=128,
    use_linear_projection=True,
)
X4_VAE = dict(
    block_out_channels=[128, 256, 512],
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    latent_channels=4,
    layers_per_block=2,
    sample_size=256,
    scaling_factor=0.08333,
)
X4_CLIP = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=23,
    max_position_embeddings=77,
    vocab_size=49408,
    hidden_act="gelu",
    projection_dim=512,
)
TINY_X4_UNET = {
    **X4_UNET,
    "block_out_channels": [32, 32, 64, 64],
    "cross_attention_dim": 32,
    "layers_per_block": 1,
}
TINY_X4_VAE = {**X4_VAE, "block_out_channels": [32, 32, 64]}
TINY_X4_CLIP = {**X4_CLIP, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
SCHEDULER = dict(
    beta_schedule="scaled_linear",
    beta_start=0.0001,
    beta_end=0.02,
    clip_sample=False,
    prediction_type="v_prediction",
    set_alpha_to_one=False,
    steps_offset=1,
)


def byte_tokenizer() -> object:
    """A CLIP tokenizer over single printable characters (the ids, not the words, matter)."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _random(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random float32 tensors shaped as ``module``'s (built on meta), one at a time."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in module.state_dict().items():
        out[name] = torch.empty(t.shape).normal_(0.0, 0.02, generator=g)
    return out


def write_x4(root: Path, tiny: bool) -> dict[str, int]:
    """A StableDiffusionUpscalePipeline folder at ``root`` with random float32 weights (the
    dtype it is evaluated in here; 3.5 GB at full size); returns each part's parameters."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, vae_cfg, clip_cfg = (
        (TINY_X4_UNET, TINY_X4_VAE, TINY_X4_CLIP) if tiny else (X4_UNET, X4_VAE, X4_CLIP)
    )
    with torch.device("meta"):
        parts = {
            "unet": UNet2DConditionModel(**unet_cfg),
            "vae": AutoencoderKL(**vae_cfg),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**clip_cfg)),
        }
    params = {}
    for k, (name, model) in enumerate(parts.items()):
        (root / name).mkdir(parents=True)
        state = _random(model, 10 + k)
        params[f"x4_{name}"] = sum(v.numel() for v in state.values())
        if name == "text_encoder":
            model.config.save_pretrained(root / name)
            save_file(state, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        else:
            (root / name / "config.json").write_text(json.dumps(dict(model.config), indent=2))
            save_file(state, str(root / name / "diffusion_pytorch_model.safetensors"))
        del state
    byte_tokenizer().save_pretrained(root / "tokenizer")
    DDIMScheduler(**SCHEDULER).save_config(root / "scheduler")
    low = {k: SCHEDULER[k] for k in ("beta_schedule", "beta_start", "beta_end")}
    DDPMScheduler(**low).save_config(root / "low_res_scheduler")
    index = {
        "_class_name": "StableDiffusionUpscalePipeline",
        "max_noise_level": 350,
        **{p: ["diffusers", type(m).__name__] for p, m in parts.items() if p != "text_encoder"},
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "low_res_scheduler": ["diffusers", "DDPMScheduler"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return params


def eval_flops(unet_dir: Path, size: int, width: int, lowres: bool, guided: bool = True) -> float:
    """FLOPs of one (guided: batch 2) evaluation of the U-Net in ``unet_dir`` at ``size`` px,
    counted from the layer shapes on the meta device (torch's FlopCounterMode)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = json.loads((unet_dir / "config.json").read_text())
    b = 2 if guided else 1
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
        x = torch.randn(b, config["in_channels"], size, size)
        text = torch.randn(b, 77, width)
        labels = torch.full((b,), 100) if lowres else None
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            unet(x, 500, encoder_hidden_states=text, class_labels=labels, return_dict=False)
    return float(counter.get_total_flops())


def vae_decode_flops(vae_dir: Path, latent: int) -> float:
    """FLOPs of one VAE decode of a ``latent``-px latent, counted on the meta device."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    config = json.loads((vae_dir / "config.json").read_text())
    with torch.device("meta"):
        vae = AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")})
        z = torch.randn(1, config.get("latent_channels", 4), latent, latent)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            vae.decode(z, return_dict=False)
    return float(counter.get_total_flops())


# One guided evaluation of a stage of an imported model, ours: the stage's own denoiser
# (k = the stage, low-memory loading in the stored precision, or float32 with --fp32), or
# diffusers' UNet2DConditionModel forward on the same weights, at the stage's input shape.
EVAL = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
kind, path, k, fp32 = sys.argv[1], sys.argv[2], int(sys.argv[5]), sys.argv[6] == "fp32"
if kind == "ours":
    from imagen.models.cascade import load_cascade
    from imagen.text.encoders import TextEmbedding
    dtype = torch.float32 if fp32 else torch.bfloat16
    cascade = load_cascade(path, low_memory=True, weights_dtype=dtype)
    stage = cascade.stages[k]
    cascade.low_memory.materialise(stage, k)
    c, n, _ = stage.config.sample_shape
    width = stage.config.unet.text_dim
    text = TextEmbedding(torch.randn(1, 77, width), torch.ones(1, 77, dtype=torch.bool))
    lowres = None
    if stage.config.is_super_resolution:
        lowres = torch.rand(1, 3, stage.config.lowres_size, stage.config.lowres_size) * 2 - 1
    level = torch.full((1,), stage.config.sampling.aug_level)
    cond = stage.condition(text, lowres, level, torch.randn(1, *stage.config.lowres_shape))
    sampling = stage.config.sampling
    if fp32:
        from dataclasses import replace
        sampling = replace(sampling, precision="fp32")
    denoise = stage.denoiser(cond, sampling, sampling.autocast_dtype(torch.device("cpu")))
    x = torch.randn(1, c, n, n)
    run = lambda: denoise(x, 500)
else:
    from diffusers import UNet2DConditionModel
    dtype = torch.float32 if fp32 else torch.bfloat16
    unet = UNet2DConditionModel.from_pretrained(path, torch_dtype=dtype).eval()
    n = int(sys.argv[7]); width = unet.config.cross_attention_dim
    hid = unet.config.encoder_hid_dim or width
    xb = torch.randn(2, unet.config.in_channels, n, n, dtype=dtype)
    tb = torch.randn(2, 77, hid, dtype=dtype)
    labels = torch.full((2,), 100) if unet.config.num_class_embeds or unet.config.class_embed_type else None
    run = lambda: unet(xb, 500, encoder_hidden_states=tb, class_labels=labels, return_dict=False)[0]
times = []
with torch.no_grad():
    for i in range(int(sys.argv[4]) + 1):
        t0 = time.perf_counter(); run(); times.append(time.perf_counter() - t0)
print(json.dumps({"first_s": round(times[0], 2), "s_per_eval": round(sorted(times[1:])[len(times[1:]) // 2], 2)}))
"""
