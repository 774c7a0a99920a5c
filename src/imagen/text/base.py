"""What every text encoder is: the :class:`TextEncoder` interface, its config record and the
:class:`TextEmbedding` it returns (text/encoders.py and text/clip.py implement it)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean of the unmasked token embeddings; zeros where the mask is empty (the null text)."""
    m = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1)


@dataclass
class TextEmbedding:
    """Encoded captions: ``tokens`` (B, L, D) float, ``mask`` (B, L) bool (True = real token),
    ``pooled`` (B, D) the masked mean of the tokens (zeros for the null caption)."""

    tokens: Tensor
    mask: Tensor

    @property
    def pooled(self) -> Tensor:
        return masked_mean(self.tokens, self.mask)

    def to(self, device: torch.device | str) -> TextEmbedding:
        return TextEmbedding(self.tokens.to(device), self.mask.to(device))


def pad_embeddings(rows: list[Tensor]) -> TextEmbedding:
    """Stack per-caption token embeddings of different lengths (L_i, D) into a padded
    :class:`TextEmbedding`; a zero-length row is the null caption."""
    length = max(1, max(r.shape[0] for r in rows))
    dim = rows[0].shape[1]
    tokens = torch.zeros(len(rows), length, dim, dtype=torch.float32)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : r.shape[0]] = r.float()
        mask[i, : r.shape[0]] = True
    return TextEmbedding(tokens, mask)


def unpad_embeddings(emb: TextEmbedding) -> list[Tensor]:
    """The inverse of :func:`pad_embeddings`: each caption's tokens at its true length."""
    lengths = emb.mask.sum(1).tolist()
    return [emb.tokens[i, :n] for i, n in enumerate(lengths)]


@dataclass
class TextEncoderConfig:
    """Which frozen text encoder a model is conditioned on."""

    name: str = "minilm"  # minilm | hash-D | a T5 / BERT checkpoint name or local directory
    max_length: int = 32  # tokens kept per caption (the paper's reimplementations use 128)
    # "max_length": T5 as DeepFloyd IF uses it (text/t5.py): padded to max_length, every
    # position's output kept, the empty caption encoded; "longest": padding masked out
    padding: str = "longest"
    tokenizer: str | None = None  # the tokenizer's directory, where not the model's
    clean_caption: bool = True  # padding "max_length": diffusers' caption cleaning if installed
    kind: str = ""  # "clip": CLIP's text tower (text/clip.py); "": chosen by name and padding

    def __post_init__(self) -> None:
        if self.padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be longest or max_length, got {self.padding!r}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be positive, got {self.max_length}")
        if self.kind not in ("", "clip"):
            raise ValueError(f"text encoder kind must be clip or empty, got {self.kind!r}")


def load_frozen(
    model_cls: Any, tokenizer_cls: Any, name: str, tokenizer: str | None, dtype: Any, what: str
) -> tuple[Any, nn.Module]:
    """A transformers text model (``model_cls``) and its tokenizer from ``name`` (the tokenizer
    from ``tokenizer`` where given), the model frozen in eval mode; ``what`` names it in the
    error. Weights load from safetensors only: a pickle (pytorch_model.bin) is never loaded,
    even beside them."""
    try:
        tok = tokenizer_cls.from_pretrained(tokenizer or name)
        model = model_cls.from_pretrained(name, dtype=dtype, use_safetensors=True)
    except OSError as e:
        raise OSError(f"could not load the {what} from {name!r}: {e}") from e
    return tok, model.eval().requires_grad_(False)


def validate_captions(captions: list[str]) -> list[str]:
    """Captions must be strings; anything else is a clear error naming the record."""
    if isinstance(captions, str):
        raise TypeError("encode() takes a list of captions, not a single string")
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise TypeError(f"caption {i} is {type(c).__name__}, not str: {c!r:.80}")
    return list(captions)


class TextEncoder(nn.Module):
    """Interface: a frozen module turning a list of captions into a :class:`TextEmbedding`.

    An empty (or all-whitespace) caption is the null condition: zero tokens, empty mask.
    Captions longer than ``max_length`` tokens are truncated and counted in
    ``self.truncated``.
    """

    name: str
    dim: int
    max_length: int
    keeps_padding = False  # the model uses every position's output (T5 as DeepFloyd IF uses it)

    def __init__(self) -> None:
        super().__init__()
        self.truncated = 0

    def encode(self, captions: list[str]) -> TextEmbedding:  # pragma: no cover - interface
        raise NotImplementedError

    def train(self, mode: bool = True) -> TextEncoder:  # frozen: always in eval mode
        return super().train(False)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def config(self) -> dict[str, object]:
        return {"name": self.name, "dim": self.dim, "max_length": self.max_length}

    def count_truncated(self, tokenizer: Any, texts: list[str]) -> None:
        """Count (and warn of) the captions ``tokenizer`` would cut at ``max_length`` tokens."""
        lengths = tokenizer(texts, truncation=False, padding=False)["input_ids"]
        over = sum(len(ids) > self.max_length for ids in lengths)
        if over:
            self.truncated += over
            log.warning("%d caption(s) truncated to %d tokens", over, self.max_length)

    def token_rows(self, emb: TextEmbedding) -> list[Tensor]:
        """Each caption's tokens as caches store them and models see them: at its true length,
        or every position for an encoder that keeps its padding outputs."""
        return list(emb.tokens) if self.keeps_padding else unpad_embeddings(emb)

    def _null_out_empty(self, captions: list[str], emb: TextEmbedding) -> TextEmbedding:
        empty = torch.tensor([not c.strip() for c in captions], device=emb.mask.device)
        if bool(empty.any()):
            emb.mask[empty] = False
            emb.tokens[empty] = 0.0
        return emb
