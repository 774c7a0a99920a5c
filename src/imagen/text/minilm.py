"""The default text encoder's network, all-MiniLM-L6-v2 (a 6-layer uncased BERT), without
transformers.

Importing transformers' BERT costs seconds of its model-loading machinery for a 22.7M-parameter
network, which was most of a cold ``imagen sample``. Here the network is this module's own code
(BERT's encoder: embeddings, six post-norm attention blocks with exact GELU, the padding mask
given to attention as transformers gives it), the WordPiece tokenizer is the ``tokenizers``
library reading the model's ``tokenizer.json``, and the weights are read with safetensors into
modules that are never randomly initialised. :class:`imagen.text.encoders.MiniLMEncoder` is the
text encoder over it. Its outputs equal transformers' ``BertModel`` ``last_hidden_state`` on
the same model (bit for bit on this machine; tests/test_cold_start.py checks 1e-5).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn import functional as F

FILES = ("config.json", "tokenizer.json", "model.safetensors")
"""What a MiniLM model directory must hold for this encoder."""


def is_minilm_dir(path: str | Path) -> bool:
    """True when ``path`` is a local BERT directory this module can load."""
    p = Path(path)
    if not all((p / f).is_file() for f in FILES):
        return False
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        config.get("model_type") == "bert"
        and config.get("hidden_act") == "gelu"
        and config.get("position_embedding_type", "absolute") == "absolute"
    )


def _empty(*shape: int) -> nn.Parameter:
    """An uninitialised parameter: every one is replaced by the file's tensor when loading."""
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class _Linear(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight, self.bias = _empty(n_out, n_in), _empty(n_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class _LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = _empty(dim), _empty(dim), eps

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class _Embedding(nn.Module):
    def __init__(self, n: int, dim: int) -> None:
        super().__init__()
        self.weight = _empty(n, dim)


class _Dense(nn.Module):
    """A linear layer, then the residual and LayerNorm (BERT's ``*.output`` blocks)."""

    def __init__(self, n_in: int, dim: int, eps: float) -> None:
        super().__init__()
        self.dense = _Linear(n_in, dim)
        self.LayerNorm = _LayerNorm(dim, eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _QKV(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query, self.key, self.value = _Linear(dim, dim), _Linear(dim, dim), _Linear(dim, dim)


class _Attention(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.self = _QKV(dim)
        self.output = _Dense(dim, dim, eps)


class _Intermediate(nn.Module):
    def __init__(self, dim: int, ff: int) -> None:
        super().__init__()
        self.dense = _Linear(dim, ff)


class _Layer(nn.Module):
    """One BERT block: self-attention, then the feed-forward network, each post-norm."""

    def __init__(self, dim: int, heads: int, ff: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.attention = _Attention(dim, eps)
        self.intermediate = _Intermediate(dim, ff)
        self.output = _Dense(ff, dim, eps)

    def forward(self, x: Tensor, attend: Tensor | None) -> Tensor:
        b, n, d = x.shape
        qkv = self.attention.self

        def split(t: Tensor) -> Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(
            split(qkv.query(x)), split(qkv.key(x)), split(qkv.value(x)), attn_mask=attend
        )
        x = self.attention.output(a.transpose(1, 2).reshape(b, n, d), x)
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, positions: int, types: int, dim: int, eps: float) -> None:
        super().__init__()
        self.word_embeddings = _Embedding(vocab, dim)
        self.position_embeddings = _Embedding(positions, dim)
        self.token_type_embeddings = _Embedding(types, dim)
        self.LayerNorm = _LayerNorm(dim, eps)

    def forward(self, ids: Tensor) -> Tensor:
        x = F.embedding(ids, self.word_embeddings.weight) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x + self.position_embeddings.weight[: ids.shape[1]])


class BertEncoderNetwork(nn.Module):
    """BERT's encoder (no pooler), its parameter names those of transformers' ``BertModel``."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        dim, eps = int(config["hidden_size"]), float(config["layer_norm_eps"])
        self.embeddings = _Embeddings(
            int(config["vocab_size"]),
            int(config["max_position_embeddings"]),
            int(config["type_vocab_size"]),
            dim,
            eps,
        )
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            _Layer(dim, int(config["num_attention_heads"]), int(config["intermediate_size"]), eps)
            for _ in range(int(config["num_hidden_layers"]))
        )

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Per-token outputs (B, L, D) of token ids (B, L) with their padding mask (B, L)."""
        x = self.embeddings(ids)
        attend = None if bool(mask.all()) else mask[:, None, None, :]  # as transformers does
        for layer in self.encoder.layer:
            x = layer(x, attend)
        return x


class MiniLM(nn.Module):
    """all-MiniLM-L6-v2 (or another BERT directory with ``tokenizer.json``): the tokenizer and
    the frozen network, optionally in bf16/fp16. :class:`imagen.text.encoders.MiniLMEncoder`
    is the text encoder over it."""

    def __init__(
        self, path: str | Path, max_length: int = 32, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        from tokenizers import Tokenizer

        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
        root = Path(path)
        config = json.loads((root / "config.json").read_text())
        self.tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        network = BertEncoderNetwork(config)  # uninitialised: the weights come from the file
        state = load_file(str(root / "model.safetensors"))
        state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
        state.pop("embeddings.position_ids", None)
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        network.load_state_dict(state, strict=True, assign=True)
        self.network = network.eval().requires_grad_(False)
        self.dim = int(config["hidden_size"])

    def token_ids(self, captions: list[str]) -> list[list[int]]:
        """Each caption's token ids, [CLS] and [SEP] included, truncated to ``max_length``."""
        return [e.ids for e in self.tokenizer.encode_batch(captions)]

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor, int]:
        """The captions' float32 token outputs (B, L, D), zero at padding, their mask (B, L)
        (True = a real token) and how many captions were truncated."""
        encodings = self.tokenizer.encode_batch(captions)
        length = max((len(e.ids) for e in encodings), default=1)
        ids = torch.zeros(len(captions), length, dtype=torch.long)
        mask = torch.zeros(len(captions), length, dtype=torch.bool)
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)] = torch.tensor(e.ids)
            mask[i, : len(e.ids)] = True
        device = self.network.embeddings.word_embeddings.weight.device
        ids, mask = ids.to(device), mask.to(device)
        tokens = self.network(ids, mask).float() * mask[..., None]
        return tokens, mask, sum(bool(e.overflowing) for e in encodings)
