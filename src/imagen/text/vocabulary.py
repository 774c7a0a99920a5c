"""A model's training vocabulary: the words of the captions it was trained on, recorded by
``imagen export`` in the model directory, so that a prompt with words the model never saw
can be named to the user instead of silently giving an unrelated image."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def caption_words(text: str) -> list[str]:
    """The lower-cased words of a caption, in order."""
    return WORD.findall(text.lower())


def vocabulary(captions: Iterable[str]) -> list[str]:
    """The sorted distinct words of ``captions``."""
    return sorted({w for c in captions for w in caption_words(c)})


def dataset_vocabulary(dataset: Any) -> list[str] | None:
    """A training dataset's vocabulary: its own ``vocabulary()`` where it draws captions as it
    goes (Shapes paraphrases), else the words of its ``captions()`` where they are known ahead,
    else None (a folder of unknown captions records none)."""
    if hasattr(dataset, "vocabulary"):
        return list(dataset.vocabulary())
    if hasattr(dataset, "captions"):
        return vocabulary(dataset.captions())
    return None


def unknown_words(prompts: Iterable[str], known: Iterable[str]) -> list[str]:
    """The words of ``prompts`` that are not in ``known``, in first-seen order."""
    vocab = set(known)
    return list(dict.fromkeys(w for p in prompts for w in caption_words(p) if w not in vocab))
