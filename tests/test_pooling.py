"""Pooling strategies: definitions, instruction exclusion, padding-side invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model

from embedkit import Embedder
from embedkit.pooling import LatentAttentionConfig, LatentAttentionPooling, pooler_class, shared_pooler

TEXTS = ["The quick brown fox jumps over the lazy dog", "Hi there", "A third, medium length sentence."]
INSTRUCTION = "Retrieve passages that answer the question: "


def make(pooling: str, attention: str = "causal", arch: str = "llama", **kwargs) -> Embedder:
    model, tokenizer = tiny_model(arch, "sdpa")
    return Embedder.from_pretrained(arch, backbone=model, tokenizer=tokenizer, pooling=pooling,
                                    attention=attention, normalize=False, **kwargs)


def hidden_and_masks(embedder: Embedder, texts, instruction=None, padding_side="right"):
    tokenized = embedder.tokenize(texts, instruction)
    ids, mask, pool_mask = embedder.collate(tokenized, padding_side=padding_side)
    with torch.inference_mode():
        return embedder.hidden_states(ids, mask), mask, pool_mask, ids


@pytest.mark.parametrize("pooling", ["mean", "weighted_mean", "last", "eos", "first", "latent_attention"])
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_left_and_right_padding_agree(pooling, attention):
    embedder = make(pooling, attention)
    for instruction in (None, INSTRUCTION):
        left = embedder.encode(TEXTS, instruction=instruction, padding_side="left")
        right = embedder.encode(TEXTS, instruction=instruction, padding_side="right")
        np.testing.assert_allclose(left, right, atol=1e-5)
        alone = np.stack([embedder.encode([t], instruction=instruction)[0] for t in TEXTS])
        np.testing.assert_allclose(right, alone, atol=1e-5)


def test_mean_excludes_instruction_but_attends_to_it():
    embedder = make("mean")
    hidden, mask, pool_mask, _ = hidden_and_masks(embedder, TEXTS[:1], INSTRUCTION)
    n_instr = int(mask.sum() - pool_mask.sum())
    assert n_instr == len(embedder.tokenizer(INSTRUCTION)["input_ids"])  # llama2 tokenizer: BOS + words, no EOS
    expected = hidden[0, n_instr:int(mask.sum())].mean(dim=0).numpy()
    got = embedder.encode(TEXTS[:1], instruction=INSTRUCTION)[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # attended to: the same text tokens without the instruction have other states under causal attention
    plain = embedder.encode(TEXTS[:1])[0]
    assert np.abs(plain - got).max() > 1e-3


def test_last_first_eos_weighted_definitions():
    last = make("last")
    hidden, mask, _, ids = hidden_and_masks(last, TEXTS[:2], padding_side="left")
    np.testing.assert_allclose(last.encode(TEXTS[:2]), hidden[:, -1].numpy(), atol=1e-5)  # left: last column

    first = make("first")
    hidden, mask, pool_mask, ids = hidden_and_masks(first, TEXTS[:1], INSTRUCTION)
    n_instr = int(mask.sum() - pool_mask.sum())
    np.testing.assert_allclose(first.encode(TEXTS[:1], instruction=INSTRUCTION)[0], hidden[0, n_instr].numpy(),
                               atol=1e-5)

    eos = make("eos")
    tokenized = eos.tokenize(TEXTS[:2])
    assert all(seq[-1] == eos.tokenizer.eos_token_id for seq in tokenized.ids)
    assert len(tokenized.ids[0]) == len(eos.tokenizer(TEXTS[0])["input_ids"]) + 1

    weighted = make("weighted_mean")
    hidden, mask, _, _ = hidden_and_masks(weighted, TEXTS[:1])
    n = int(mask.sum())
    w = torch.arange(1, n + 1, dtype=torch.float32)
    expected = (hidden[0, :n] * w[:, None]).sum(0) / w.sum()
    np.testing.assert_allclose(weighted.encode(TEXTS[:1])[0], expected.numpy(), atol=1e-5)


def test_registry_rejects_unknown_and_trainable_shared_poolers():
    with pytest.raises(ValueError, match="Unknown pooling 'max'; valid: mean, weighted_mean, last, eos, first"):
        pooler_class("max")
    with pytest.raises(ValueError, match="pooling 'latent_attention' has trained weights"):
        shared_pooler("latent_attention")


def test_unknown_pooling_lists_valid():
    with pytest.raises(ValueError, match="Unknown pooling 'cls'; valid: mean, weighted_mean, last, eos, first"):
        make("cls")


def test_latent_attention_pooler_is_trainable_and_masked():
    pooler = LatentAttentionPooling(LatentAttentionConfig(hidden_size=16, num_latents=8, num_heads=2))
    hidden = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = pooler.pool(hidden, mask, mask)
    assert out.shape == (2, 16)
    # padded positions do not matter
    noisy = hidden.clone()
    noisy[0, 3:] = 100.0
    torch.testing.assert_close(pooler.pool(noisy, mask, mask)[0], out[0])
    out.sum().backward()
    assert pooler.latents.grad is not None and pooler.latents.grad.abs().sum() > 0


def test_a_pooling_registered_outside_the_package_encodes_saves_and_loads_in_sentence_transformers(
        stories_path, tmp_path, monkeypatch):
    import json  # noqa: PLC0415

    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    from embedkit.pooling import base  # noqa: PLC0415

    monkeypatch.setattr(base, "POOLERS", dict(base.POOLERS))

    @base.register_pooler
    class MaxPooler(base.Pooler):
        name = "toy_max"
        st_pooling_mode = "max"

        def pool(self, hidden, attention_mask, pool_mask):
            return hidden.masked_fill(~pool_mask.bool().unsqueeze(-1), float("-inf")).max(dim=1).values

    embedder = Embedder.from_pretrained(stories_path, dtype="float32", pooling="toy_max")
    hidden, mask, pool_mask, _ = hidden_and_masks(embedder, TEXTS)
    expected = torch.stack([hidden[i, :int(mask[i].sum())].max(dim=0).values for i in range(len(TEXTS))])
    got = embedder.encode(TEXTS, normalize=False)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-3, atol=1e-5)
    folder = embedder.save(tmp_path / "toy")
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "max"
    st = SentenceTransformer(str(folder))
    np.testing.assert_allclose(st.encode(TEXTS), embedder.encode(TEXTS), atol=1e-5)
    assert Embedder.load(folder).config.pooling == "toy_max"


def test_old_latent_attention_module_path_stays_importable():
    import importlib  # noqa: PLC0415

    assert importlib.import_module("embedkit.pooling").LatentAttentionPooling is LatentAttentionPooling
    assert LatentAttentionPooling.module_type == "embedkit.pooling.LatentAttentionPooling"
