"""CLIP score: how well an image matches its prompt, by a CLIP model (``imagen eval clip``).

The score of image I for caption C is torchmetrics' ``CLIPScore`` of the pair,
``100 * max(cos(E_I, E_C), 0)``, with E_I and E_C the CLIP model's projected image and text
embeddings (Hessel et al. 2021, without their weight w = 2.5). The model is a transformers
``CLIPModel`` with its processor, loaded once from a directory or a Hugging Face Hub id (from
the local cache; downloaded once when allowed, never with ``HF_HUB_OFFLINE=1``); the default
is ``openai/clip-vit-large-patch14``, as in torchmetrics.

Two details differ from torchmetrics' own call, neither for captions that fit CLIP's 77
tokens: a longer caption is truncated by the tokenizer, so it keeps its end token (which
CLIP pools at; torchmetrics cuts the token ids after tokenizing and so drops it), and images
are preprocessed by the processor's PIL backend whether or not torchvision is installed (the
same numbers on every machine).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def clip_score(image_features: Tensor, text_features: Tensor) -> Tensor:
    """Per-pair CLIP score of (N, D) image and text embeddings: 100 * max(cos, 0), computed
    as torchmetrics computes it."""
    image = image_features / image_features.norm(p=2, dim=-1, keepdim=True)
    text = text_features / text_features.norm(p=2, dim=-1, keepdim=True)
    score = 100 * (image * text).sum(axis=-1)
    return torch.max(score, torch.zeros_like(score))


def _embedding(out: Any) -> Tensor:
    """The projected embedding from ``get_*_features``: a tensor in transformers 4, the
    ``pooler_output`` of a model output in transformers 5."""
    return out if isinstance(out, Tensor) else out.pooler_output


class ClipScorer:
    """A CLIP model and its processor, loaded once: embeddings in batches of ``batch_size``
    (each distinct caption embedded once) and per-image scores."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        name: str = DEFAULT_CLIP,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        self.model = model.eval().to(device)
        self.processor, self.name = processor, name
        self.device, self.batch_size = torch.device(device), batch_size
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self._texts: dict[str, Tensor] = {}

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> Tensor:
        """(N, D) embeddings of ``texts`` (float32, on the CPU)."""
        new = [t for t in dict.fromkeys(texts) if t not in self._texts]
        for i in range(0, len(new), self.batch_size):
            chunk = new[i : i + self.batch_size]
            tokens = self.processor.tokenizer(
                chunk,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            out = self.model.get_text_features(
                tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
            )
            self._texts.update(zip(chunk, _embedding(out).float().cpu(), strict=True))
        return torch.stack([self._texts[t] for t in texts])

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> Tensor:
        """(N, D) embeddings of ``images`` (float32, on the CPU), ``batch_size`` at a time."""
        feats = []
        for i in range(0, len(images), self.batch_size):
            chunk = [im.convert("RGB") for im in images[i : i + self.batch_size]]
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"]
            out = self.model.get_image_features(pixel_values=pixels.to(self.device))
            feats.append(_embedding(out).float().cpu())
        return torch.cat(feats)

    def scores(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
        """The CLIP score of each image for its text."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        if not images:
            return []
        return clip_score(self.image_features(images), self.text_features(texts)).tolist()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def how_to_get(name: str, why: str) -> str:
    """The one-line error for a CLIP model that is not at hand: why, and how to get one."""
    size = ", about 1.7 GB," if name == DEFAULT_CLIP else ""
    return (
        f"no CLIP model at hand: {why}. Run this command once with network access and without "
        f"HF_HUB_OFFLINE=1 (transformers downloads {name}{size} into the Hugging Face cache), "
        "after which it runs offline; or pass --clip DIR, a CLIPModel and its processor saved "
        "with save_pretrained"
    )


def load_clip(
    name: str = DEFAULT_CLIP, device: str | torch.device = "cpu", batch_size: int = 32
) -> ClipScorer:
    """A :class:`ClipScorer` of the CLIP model in directory ``name``, or of Hub repo ``name``
    from the local cache (downloaded first when ``HF_HUB_OFFLINE`` is not set). Anything
    missing is a FileNotFoundError with one line saying how to get a model."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(how_to_get(name, f"{name} has no config.json"))
        return ClipScorer(*_from_pretrained(str(path), True), name, device, batch_size)
    if not REPO_ID.match(name):
        raise FileNotFoundError(how_to_get(name, f"{name} is not a directory nor a Hub repo id"))
    try:
        return ClipScorer(*_from_pretrained(name, True), name, device, batch_size)
    except OSError:
        if _offline():
            why = f"{name} is not in the Hugging Face cache (HF_HUB_OFFLINE is set)"
            raise FileNotFoundError(how_to_get(name, why)) from None
    try:
        return ClipScorer(*_from_pretrained(name, False), name, device, batch_size)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = f"{name} is not in the Hugging Face cache and could not be fetched ({first})"
        raise FileNotFoundError(how_to_get(name, why)) from None


def _from_pretrained(source: str, local_only: bool) -> tuple[Any, Any]:
    """transformers' CLIPModel and processor of ``source`` (the processor's PIL backend)."""
    import transformers
    from transformers import AutoProcessor, CLIPModel

    major = int(transformers.__version__.split(".")[0])
    backend = {"backend": "pil"} if major >= 5 else {"use_fast": False}
    processor = AutoProcessor.from_pretrained(source, local_files_only=local_only, **backend)
    model = CLIPModel.from_pretrained(source, local_files_only=local_only, use_safetensors=True)
    return model, processor
