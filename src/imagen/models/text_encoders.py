"""The text encoders of a cascade: one per stage record, each distinct one held once.

Stages may read different encoders (an imported DeepFloyd IF cascade conditions stages I and II
on T5-XXL and the x4 upscaler on its own CLIP text model). :class:`StageEncoders` keys each
encoder by its record (:func:`encoder_key`), encodes each prompt once per encoder that a run
needs, and, in low-memory mode, loads each encoder for its turn and releases it after.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Mapping
from typing import Any

from imagen.text.encoders import (
    TextEmbedding,
    TextEncoder,
    TextEncoderConfig,
    check_encoder_matches,
)

Loader = Callable[[dict[str, Any]], TextEncoder]


def encoder_key(record: Mapping[str, Any]) -> str:
    """The identity of an encoder record: every field but its width, as canonical JSON."""
    return json.dumps({k: record[k] for k in sorted(record) if k != "dim"}, default=str)


def encoder_config(record: Mapping[str, Any]) -> TextEncoderConfig:
    """The text encoder a model directory's record names (its name, length and padding)."""
    keys = ("padding", "tokenizer", "clean_caption", "kind")
    return TextEncoderConfig(
        name=record["name"],
        max_length=int(record["max_length"]),
        **{k: record[k] for k in keys if k in record},
    )


class StageEncoders:
    """Each stage's text encoder, by record. Built from one encoder for every stage (the usual
    case: each stage's record, where it has one, must match it), from encoders loaded by key,
    or from the stages' records with a ``loader`` that loads an encoder when it is first
    needed (and again after a release, when ``keep`` is False: low-memory mode)."""

    def __init__(
        self,
        records: list[dict[str, Any]],
        given: TextEncoder | Mapping[str, TextEncoder] | None = None,
        loader: Loader | None = None,
        keep: bool = True,
    ) -> None:
        if isinstance(given, Mapping):  # loaded already, by key
            self.keys = [encoder_key(r) for r in records]
            missing = [k for k in self.keys if k not in given]
            if missing:
                raise ValueError(f"no text encoder given for the record {missing[0]}")
            self.records = {encoder_key(r): dict(r) for r in records}
            self.loaded = {k: given[k] for k in self.records}
        elif given is not None:
            for r in records:
                if r:
                    check_encoder_matches(r, given)
            key = encoder_key(given.config())
            self.keys = [key] * len(records)
            self.records = {key: {**given.config(), "dim": given.dim}}
            self.loaded: dict[str, TextEncoder | None] = {key: given}
        else:
            if loader is None or not all(records):
                raise ValueError("a cascade needs its text encoder")
            self.keys = [encoder_key(r) for r in records]
            self.records = {encoder_key(r): dict(r) for r in records}
            self.loaded = dict.fromkeys(self.records)
        self.loader, self.keep = loader, keep

    def get(self, key: str) -> TextEncoder:
        """The encoder of ``key``, loaded first if it is not in memory."""
        encoder = self.loaded[key]
        if encoder is None:
            assert self.loader is not None
            encoder = self.loader(self.records[key])
            self.loaded[key] = encoder
        return encoder

    def encode(self, texts: list[str], keys: list[str]) -> dict[str, TextEmbedding]:
        """``texts`` encoded once by each encoder in ``keys`` (each released after, unless kept)."""
        out = {}
        for key in dict.fromkeys(keys):
            out[key] = self.get(key).encode(texts)
            if not self.keep:
                self.loaded[key] = None
                gc.collect()
        return out
