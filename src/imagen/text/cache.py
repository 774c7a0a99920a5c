"""On-disk text-embedding cache (``imagen embed``): each distinct caption encoded once.

Layout of a cache directory::

    encoder.json                    the encoder (name, dim, max_length) that made it
    shard-RRRRR-KKKKK.tokens.npy    fp16 (total tokens, dim): each caption's tokens at its
                                    true length, no padding, concatenated
    shard-RRRRR-KKKKK.offsets.npy   int64 (captions + 1): row ranges into tokens
    shard-RRRRR-KKKKK.captions.json the captions of the shard, in order

Shards are read by memory map. Process R of W (torchrun) encodes every W-th distinct caption
and writes its own shards, so precomputation splits across processes with no coordination.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from imagen.text.encoders import TextEncoder

ENCODER_FILE = "encoder.json"


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_cache(
    captions: Iterable[str],
    encoder: TextEncoder,
    out_dir: str | Path,
    batch_size: int = 256,
    shard_captions: int = 100_000,
    rank: int = 0,
    world: int = 1,
) -> dict[str, Any]:
    """Encode the distinct captions (this process's share of them) into ``out_dir``; returns
    statistics: captions, bytes, bytes per caption, captions per second."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = encoder.config()
    enc_path = out / ENCODER_FILE
    if enc_path.is_file() and json.loads(enc_path.read_text()) != meta:
        raise ValueError(
            f"{out} holds embeddings from {json.loads(enc_path.read_text())}, not {meta}; "
            "use another directory"
        )
    enc_path.write_text(json.dumps(meta) + "\n")
    unique = list(dict.fromkeys(captions))[rank::world]
    start, total_bytes = time.time(), 0
    for k, lo in enumerate(range(0, len(unique), shard_captions)):
        chunk = unique[lo : lo + shard_captions]
        rows: list[Tensor] = []
        for b in range(0, len(chunk), batch_size):
            rows += [
                r.to(torch.float16).cpu()
                for r in encoder.token_rows(encoder.encode(chunk[b : b + batch_size]))
            ]
        lengths = [r.shape[0] for r in rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(lengths)
        tokens = torch.cat(rows).numpy() if offsets[-1] else np.zeros((0, encoder.dim), np.float16)
        stem = out / f"shard-{rank:05d}-{k:05d}"
        _atomic_save_npy(stem.with_name(stem.name + ".tokens.npy"), tokens)
        _atomic_save_npy(stem.with_name(stem.name + ".offsets.npy"), offsets)
        cap_path = stem.with_name(
            stem.name + ".captions.json"
        )  # written last: marks the shard complete
        cap_path.with_name(cap_path.name + ".tmp").write_text(json.dumps(chunk))
        os.replace(cap_path.with_name(cap_path.name + ".tmp"), cap_path)
        total_bytes += tokens.nbytes + offsets.nbytes
    elapsed = max(time.time() - start, 1e-9)
    n = len(unique)
    return {
        "captions": n,
        "bytes": total_bytes,
        "bytes_per_caption": total_bytes / max(n, 1),
        "captions_per_s": n / elapsed,
    }


class EmbeddingCache:
    """Read access to a cache directory: ``lookup(captions)`` returns each caption's token
    embeddings (L_i, D) at its true length."""

    def __init__(self, directory: Path, meta: dict[str, Any]) -> None:
        self.directory, self.meta = directory, meta
        self.where: dict[str, tuple[int, int]] = {}
        self.tokens: list[np.ndarray] = []
        self.offsets: list[np.ndarray] = []
        for cap_path in sorted(directory.glob("shard-*.captions.json")):
            stem = cap_path.name[: -len(".captions.json")]
            shard = len(self.tokens)
            self.tokens.append(
                np.load(directory / f"{stem}.tokens.npy", mmap_mode="r", allow_pickle=False)
            )
            self.offsets.append(np.load(directory / f"{stem}.offsets.npy", allow_pickle=False))
            for i, c in enumerate(json.loads(cap_path.read_text())):
                self.where[c] = (shard, i)

    @classmethod
    def open(cls, directory: str | Path, encoder: TextEncoder | None = None) -> EmbeddingCache:
        """Open a cache; with ``encoder``, refuse one made by another encoder or max length."""
        d = Path(directory)
        if not (d / ENCODER_FILE).is_file():
            raise FileNotFoundError(f"{d} is not a text-embedding cache (no {ENCODER_FILE})")
        meta = json.loads((d / ENCODER_FILE).read_text())
        cache = cls(d, meta)
        if encoder is not None:
            cache.check(encoder)
        return cache

    def check(self, encoder: TextEncoder) -> None:
        if self.meta != encoder.config():
            raise ValueError(
                f"embedding cache {self.directory} was made with {self.meta}, but training uses "
                f"{encoder.config()}; rebuild it with `imagen embed`"
            )

    def __len__(self) -> int:
        return len(self.where)

    def __contains__(self, caption: str) -> bool:
        return caption in self.where

    def lookup(self, captions: list[str]) -> list[Tensor]:
        out = []
        for c in captions:
            if c not in self.where:
                raise KeyError(f"caption not in the embedding cache {self.directory}: {c!r:.80}")
            shard, i = self.where[c]
            a, b = self.offsets[shard][i], self.offsets[shard][i + 1]
            out.append(torch.from_numpy(np.array(self.tokens[shard][a:b])))
        return out
