"""Tiny random DeepFloyd IF pipelines in diffusers format, built offline in the test (as
diffusers' own IF tests build theirs, with a T5 and a sentencepiece tokenizer made here)."""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "a photo of a red cat on a blue sofa",
    "an oil painting of a lighthouse at night",
    "a golden retriever in a beret",
    "two green apples and a yellow banana",
    "the quick brown fox jumps over the lazy dog",
    "a small wooden boat on a calm lake",
]
BASE_SIZE, SR_SIZE = 16, 32


def make_t5(root: Path, corpus: list[str] = CORPUS, d_model: int = 32) -> tuple[object, object]:
    """A 2-layer random T5 encoder and a unigram tokenizer trained on ``corpus`` (its files in
    ``root``)."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    root.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 4),
        model_prefix=str(root / "spiece"),
        vocab_size=48,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        minloglevel=2,
    )
    tokenizer = T5Tokenizer.from_pretrained(str(root))
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config).eval(), tokenizer


def _unet(sr: bool) -> object:
    from diffusers import UNet2DConditionModel

    extra = (
        dict(
            class_embed_type="timestep",
            mid_block_scale_factor=1.414,
            time_embedding_act_fn="gelu",
            resnet_skip_time_act=True,
            resnet_out_scale_factor=1.414,
        )
        if sr
        else {}
    )
    return UNet2DConditionModel(
        sample_size=SR_SIZE if sr else BASE_SIZE,
        layers_per_block=1,
        block_out_channels=[16, 32],
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        in_channels=6 if sr else 3,
        out_channels=6,
        cross_attention_dim=32,
        encoder_hid_dim=32,
        attention_head_dim=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
        norm_num_groups=8,
        **extra,
    )


def _scheduler(max_value: float) -> object:
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=max_value,
        prediction_type="epsilon",
        variance_type="learned_range",
    )


def make_if_pipelines(root: Path) -> tuple[Path, Path]:
    """Save a tiny IFPipeline (16 px) and IFSuperResolutionPipeline (16 -> 32 px), with the
    same random T5, under ``root``; returns their folders."""
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline

    text_encoder, tokenizer = make_t5(root / "t5")
    common = dict(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )
    torch.manual_seed(1)
    base = IFPipeline(unet=_unet(False), scheduler=_scheduler(1.5), **common)
    torch.manual_seed(2)
    sr = IFSuperResolutionPipeline(
        unet=_unet(True),
        scheduler=_scheduler(1.0),
        image_noising_scheduler=DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"
        ),
        **common,
    )
    paths = root / "if-i", root / "if-ii"
    base.save_pretrained(paths[0], safe_serialization=True)
    sr.save_pretrained(paths[1], safe_serialization=True)
    return paths
