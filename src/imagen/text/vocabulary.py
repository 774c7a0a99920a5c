"""A model's training vocabulary: the words of the captions it was trained on, recorded by
``imagen export`` in the model directory, so that a prompt with words the model never saw
can be named to the user instead of silently giving an unrelated image."""

from __future__ import annotations

import re
from collections.abc import Iterable

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def caption_words(text: str) -> list[str]:
    """The lower-cased words of a caption, in order."""
    return WORD.findall(text.lower())


def vocabulary(captions: Iterable[str]) -> list[str]:
    """The sorted distinct words of ``captions``."""
    return sorted({w for c in captions for w in caption_words(c)})


def unknown_words(prompts: Iterable[str], known: Iterable[str]) -> list[str]:
    """The words of ``prompts`` that are not in ``known``, in first-seen order."""
    vocab = set(known)
    return list(dict.fromkeys(w for p in prompts for w in caption_words(p) if w not in vocab))
