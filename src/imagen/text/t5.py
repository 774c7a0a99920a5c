"""T5 as DeepFloyd IF uses it: 77 tokens padded to full length, the attention mask given to
T5 only, every position's output kept (padding included), prompts lowercased and stripped
(or cleaned as diffusers' ``clean_caption`` does, where bs4 and ftfy are installed), and the
empty prompt encoded like any other (IF's null caption is T5(""), not zeros)."""

from __future__ import annotations

import importlib.util
import logging

import torch

from imagen.text.encoders import TextEmbedding, TextEncoder, validate_captions

log = logging.getLogger(__name__)


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


class PaddedT5Encoder(TextEncoder):
    """A frozen T5 encoder (``T5EncoderModel``) with its tokenizer in a directory of its own
    (a diffusers pipeline's ``tokenizer/``), encoding as DeepFloyd IF does."""

    def __init__(
        self,
        name: str,
        tokenizer: str | None = None,
        max_length: int = 77,
        dtype: torch.dtype | None = None,
        clean_caption: bool = True,
    ) -> None:
        super().__init__()
        from transformers import T5EncoderModel, T5Tokenizer

        try:
            self.tokenizer = T5Tokenizer.from_pretrained(tokenizer or name)
            model = T5EncoderModel.from_pretrained(name, dtype=dtype)
        except OSError as e:
            raise OSError(f"could not load the T5 text encoder from {name!r}: {e}") from e
        self.model = model.eval().requires_grad_(False)
        self.name, self.tokenizer_path = name, tokenizer
        self.dim = int(model.config.d_model)
        self.max_length = max_length
        self.clean_caption = clean_caption
        if clean_caption and not can_clean_captions():
            log.info("bs4 or ftfy is not installed: prompts are lowercased and stripped only")

    def train(self, mode: bool = True) -> PaddedT5Encoder:  # frozen: always in eval mode
        return super().train(False)

    def config(self) -> dict[str, object]:
        return {
            **super().config(),
            "tokenizer": self.tokenizer_path,
            "padding": "max_length",
            "clean_caption": self.clean_caption,
        }

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextEmbedding:
        texts = [if_caption(c, self.clean_caption) for c in validate_captions(captions)]
        lengths = self.tokenizer(texts, truncation=False, padding=False)["input_ids"]
        over = sum(len(ids) > self.max_length for ids in lengths)
        if over:
            self.truncated += over
            log.warning("%d caption(s) truncated to %d tokens", over, self.max_length)
        batch = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).to(self.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return TextEmbedding(out.last_hidden_state.float(), batch["attention_mask"].bool())
