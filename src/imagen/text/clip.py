"""CLIP's text tower as the Stable Diffusion x4 upscaler uses it (diffusers'
``StableDiffusionUpscalePipeline.encode_prompt``): the prompt padded to 77 tokens, no
attention mask given to the model, every position's output (the final layer norm's; the
checkpoint is OpenCLIP ViT-H cut to its penultimate layer) kept."""

from __future__ import annotations

import torch

from imagen.text.base import TextEmbedding, TextEncoder, load_frozen, validate_captions


class CLIPTextEncoder(TextEncoder):
    """A frozen ``CLIPTextModel`` with its ``CLIPTokenizer`` (a diffusers pipeline's
    ``text_encoder/`` and ``tokenizer/`` folders)."""

    keeps_padding = True

    def __init__(
        self,
        name: str,
        tokenizer: str | None = None,
        max_length: int = 77,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer, model = load_frozen(
            CLIPTextModel, CLIPTokenizer, name, tokenizer, dtype, "CLIP text encoder"
        )
        self.model = model
        self.name, self.tokenizer_path = name, tokenizer
        self.dim = int(model.config.hidden_size)
        self.max_length = max_length
        self.use_mask = bool(getattr(model.config, "use_attention_mask", False))

    def config(self) -> dict[str, object]:
        return {
            **super().config(),
            "tokenizer": self.tokenizer_path,
            "padding": "max_length",
            "kind": "clip",
        }

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextEmbedding:
        texts = validate_captions(captions)
        self.count_truncated(self.tokenizer, texts)
        batch = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        mask = batch["attention_mask"] if self.use_mask else None
        out = self.model(batch["input_ids"], attention_mask=mask)
        tokens = out.last_hidden_state.float()
        return TextEmbedding(
            tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        )
