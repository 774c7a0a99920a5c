"""A tiny random CLIP model in transformers' format, built offline in the test: a character-level
BPE tokenizer (vocab.json and merges.txt written here), a 2-layer text and vision tower, and a
CLIP image processor at 32 px; saved with save_pretrained so it loads by path like a real one."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SYMBOLS = "abcdefghijklmnopqrstuvwxyz0123456789"
START, END = "<|startoftext|>", "<|endoftext|>"


def make_tiny_clip(directory: Path, seed: int = 0, image_size: int = 32) -> Path:
    """Write a random CLIPModel and its CLIPProcessor to ``directory``; returns it."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    try:  # transformers 5: the PIL backend by name (the default one needs torchvision)
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4: the PIL-based processor is the default one
        from transformers import CLIPImageProcessor as ImageProcessor

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {s: i for i, s in enumerate([*SYMBOLS, *(c + "</w>" for c in SYMBOLS), START, END])}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config={
            **tower,
            "num_attention_heads": 4,
            "vocab_size": len(vocab),
            "max_position_embeddings": 77,
            "bos_token_id": vocab[START],
            "eos_token_id": vocab[END],
            "pad_token_id": vocab[END],
        },
        vision_config={
            **tower,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    crop = {"height": image_size, "width": image_size}
    images = ImageProcessor(size={"shortest_edge": image_size}, crop_size=crop)
    model.save_pretrained(directory)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(directory)
    return directory
