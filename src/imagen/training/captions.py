"""Text embeddings of training captions, without re-encoding a caption twice.

:class:`CaptionEmbeddings` reads an on-disk cache (``imagen embed``) where it holds a caption,
else runs the encoder, and memoises the result. When the captions of a dataset are a small,
known set (Shapes, a folder), :class:`CaptionTable` encodes them all once before training
and keeps them on the training device, so a step only indexes a tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from imagen.text.encoders import TextEmbedding, TextEncoder, pad_embeddings

TABLE_LIMIT_BYTES = 512 * 2**20  # captions beyond this (fp16 on the device) use the memo


class CaptionEmbeddings:
    """Embeddings for training captions: read from an on-disk cache where it holds them, else
    computed by the encoder; memoised here, as captions repeat across epochs."""

    def __init__(self, encoder: TextEncoder, cache: Any | None = None, memo_limit: int = 200_000):
        if cache is not None:
            cache.check(encoder)
        self.encoder, self.cache, self.memo_limit = encoder, cache, memo_limit
        self.memo: dict[str, torch.Tensor] = {}
        self.encoded = 0  # captions that had to be run through the encoder

    def rows(self, captions: list[str], batch_size: int = 256) -> list[torch.Tensor]:
        """Each caption's tokens at its true length (fp16, on the CPU)."""
        missing = [c for c in dict.fromkeys(captions) if c not in self.memo]
        if len(self.memo) + len(missing) > self.memo_limit:  # full: start again with this batch
            self.memo.clear()
            missing = list(dict.fromkeys(captions))
        for start in range(0, len(missing), batch_size):
            self._fill(missing[start : start + batch_size])
        return [self.memo[c] for c in captions]

    def _fill(self, missing: list[str]) -> None:
        cached = [c for c in missing if self.cache is not None and c in self.cache]
        fresh = [c for c in missing if self.cache is None or c not in self.cache]
        rows = self.cache.lookup(cached) if cached else []
        if fresh:
            rows += self.encoder.token_rows(self.encoder.encode(fresh))
            self.encoded += len(fresh)
        for c, r in zip(cached + fresh, rows, strict=True):
            self.memo[c] = r.to(torch.float16).cpu()

    def __call__(self, captions: list[str]) -> TextEmbedding:
        return pad_embeddings(self.rows(captions))


class CaptionTable:
    """Every caption of a known set, encoded once and kept on ``device``; a lookup pads to the
    batch's longest caption, exactly as :class:`CaptionEmbeddings` does, or with ``fixed`` to
    the longest of the set (one shape for every batch, as a compiled model wants)."""

    def __init__(
        self,
        captions: list[str],
        source: CaptionEmbeddings,
        device: torch.device,
        fixed: bool = False,
    ) -> None:
        captions = list(dict.fromkeys(captions))
        rows = source.rows(captions)
        self.row = {c: i for i, c in enumerate(captions)}
        self.lengths = [r.shape[0] for r in rows]
        padded = pad_embeddings(rows)
        self.tokens = padded.tokens.to(device, torch.float16)
        self.mask = padded.mask.to(device)
        self.fallback, self.fixed = source, fixed
        self.encoded = source.encoded

    @staticmethod
    def fits(num_captions: int, max_length: int, dim: int) -> bool:
        return 0 < num_captions * max_length * dim * 2 <= TABLE_LIMIT_BYTES

    def __call__(self, captions: list[str]) -> TextEmbedding:
        if any(c not in self.row for c in captions):  # outside the known set: encode
            return self.fallback(captions)
        ids = [self.row[c] for c in captions]
        length = self.tokens.shape[1] if self.fixed else max(1, max(self.lengths[i] for i in ids))
        idx = torch.tensor(ids)
        if self.tokens.device.type == "cuda":  # an asynchronous copy needs page-locked memory
            idx = idx.pin_memory().to(self.tokens.device, non_blocking=True)
        return TextEmbedding(self.tokens[idx, :length].float(), self.mask[idx, :length])


def caption_lookup(
    dataset: Any, encoder: TextEncoder, cache: Any | None, device: torch.device, fixed: bool
) -> CaptionEmbeddings | CaptionTable:
    """What a trainer embeds its captions with: a :class:`CaptionTable` on ``device`` when the
    dataset's captions are a small, known set (``fixed``: one padded length, for a compiled
    step); else the encoder, or the embedding cache, with a memo."""
    source = CaptionEmbeddings(encoder, cache)
    if not hasattr(dataset, "captions"):  # a stream: its captions are not known ahead
        return source
    captions = dataset.captions()
    max_length = int(encoder.config().get("max_length") or 77)
    if not CaptionTable.fits(len(set(captions)), max_length, encoder.dim):
        return source
    return CaptionTable(captions, source, device, fixed=fixed)
