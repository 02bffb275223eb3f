"""The offline real model: alias -> GGUF -> cached safetensors folder -> embedder (default suite, ~1 min cold)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import transformers

from embedkit import Embedder
from embedkit.backbone import _gguf_cache_folder, resolve_spec

TEXTS = ["A man is playing a guitar.", "Someone plays music on a guitar.", "The stock market fell sharply today."]


@pytest.fixture(scope="module")
def smollm2():
    return Embedder.from_pretrained("smollm2-135m", dtype="float32", max_length=64)


def test_alias_loads_real_weights_and_caches_conversion(smollm2, monkeypatch):
    resolved = resolve_spec("smollm2-135m")
    cached = _gguf_cache_folder(Path(resolved.path) / resolved.gguf_file)
    assert (cached / "model.safetensors").is_file() and (cached / "config.json").is_file()
    assert smollm2.backbone.config.num_hidden_layers == 30 and smollm2.dimension == 576
    vectors = smollm2.encode(TEXTS)
    assert vectors.shape == (3, 576)
    # real weights: the paraphrase pair is closer than the unrelated sentence
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.02

    # a second load reads the cache and never dequantises the GGUF again
    original = transformers.AutoModelForCausalLM.from_pretrained

    def refuse_gguf(*args, **kwargs):
        assert "gguf_file" not in kwargs, "GGUF was dequantised again instead of using the cache"
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse_gguf)
    again = Embedder.from_pretrained("smollm2-135m", dtype="float32", max_length=64)
    np.testing.assert_allclose(again.encode(TEXTS), vectors, atol=1e-5)


def test_bfloat16_matches_float32(smollm2):
    fast = Embedder.from_pretrained("smollm2-135m", dtype="bfloat16", max_length=64)
    cosine = (fast.encode(TEXTS) * smollm2.encode(TEXTS)).sum(axis=1)
    assert cosine.min() > 0.99
