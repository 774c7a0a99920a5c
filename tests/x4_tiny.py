"""A tiny random Stable Diffusion x4 upscaler pipeline in diffusers format, built offline in
the test: the components of diffusers' own test_stable_diffusion_upscale.py (a smaller U-Net,
1000 noise-level classes as the real model has), the real model's schedulers, and a byte-level
CLIP tokenizer made here (no merges: every word is spelled out in characters)."""

from __future__ import annotations

from pathlib import Path

import torch

# the real x4 upscaler's scheduler configs (stabilityai/stable-diffusion-x4-upscaler)
X4_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="scaled_linear",
    clip_sample=False,
    prediction_type="v_prediction",
    set_alpha_to_one=False,
    steps_offset=1,
)
X4_LOW_RES_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear"
)


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (byte-level BPE's alphabet)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [table[b] for b in range(256)]


def make_clip_tokenizer(root: Path) -> object:
    """A CLIP BPE tokenizer whose vocabulary is the 256 byte symbols (alone and word-final)
    and the two special tokens, saved in ``root``."""
    from transformers import CLIPTokenizer

    root.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    tokenizer.save_pretrained(root)
    return CLIPTokenizer.from_pretrained(root)


def make_x4_pipeline(root: Path, seed: int = 3) -> Path:
    """Save a tiny StableDiffusionUpscalePipeline under ``root / "x4"``; returns its folder."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = make_clip_tokenizer(root / "clip-tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 16, 32),
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=32,
        in_channels=7,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        use_linear_projection=True,
        only_cross_attention=(True, True, False),
        num_class_embeds=1000,
    )
    vae = AutoencoderKL(
        block_out_channels=[8, 16, 16],
        norm_num_groups=8,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4,
        scaling_factor=0.08333,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=3,
            vocab_size=len(tokenizer),
            hidden_act="gelu",
            projection_dim=32,
        )
    )
    pipe = StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        low_res_scheduler=DDPMScheduler(**X4_LOW_RES_SCHEDULER),
        scheduler=DDIMScheduler(**X4_SCHEDULER),
        max_noise_level=350,
    )
    path = root / "x4"
    pipe.save_pretrained(path, safe_serialization=True)
    return path
