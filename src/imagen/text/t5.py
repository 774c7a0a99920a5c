"""Prompts as DeepFloyd IF gives them to T5 (the encoder is ``PaddedT5Encoder`` in
text/encoders.py). IF uses T5 so: 77 tokens padded to full length, the attention mask given to
T5 only, every position's output kept (padding included), prompts lowercased and stripped
(or cleaned as diffusers' ``clean_caption`` does, where bs4 and ftfy are installed), and the
empty prompt encoded like any other (IF's null caption is T5(""), not zeros)."""

from __future__ import annotations

import importlib.util


def can_clean_captions() -> bool:
    """Whether diffusers' ``clean_caption`` can run here (it needs bs4 and ftfy)."""
    return all(importlib.util.find_spec(m) is not None for m in ("bs4", "ftfy"))


def if_caption(caption: str, clean: bool) -> str:
    """A prompt as DeepFloyd IF's pipelines give it to T5: cleaned twice by diffusers'
    ``clean_caption`` when ``clean`` and its packages are installed, else lowercased and
    stripped (what diffusers falls back to)."""
    if clean and can_clean_captions():
        from diffusers.pipelines.deepfloyd_if.pipeline_if import IFPipeline

        for _ in range(2):
            caption = IFPipeline._clean_caption(IFPipeline, caption)  # type: ignore[arg-type]
        return caption
    return caption.lower().strip()
