"""Packed forwards (embedkit/packing.py): the same vectors as padded ones, or an explicit fall back to padding."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel

from embedkit import Embedder
from embedkit import attention as attn
from embedkit.batching import Tokenized, collate
from embedkit.methods.soft_mask import soft_mask_bias
from embedkit.methods.token_prepending import enable_token_prepending
from embedkit.packing import (
    block_diagonal_mask,
    pack,
    packing_blocker,
    plan_packed_batches,
    plan_rows,
    shared_prefix_length,
)
from embedkit.pooling import pooling_names
from embedkit.serving.model_call import ModelCall
from tests.conftest import arch_impl_cases, tiny_model, tokenizer_for

WORDS = "once upon a time there was a little girl who liked to play in the sun with her dog".split()


def random_texts(n: int, seed: int = 0) -> list[str]:
    pick = random.Random(seed)
    return [" ".join(pick.choices(WORDS, k=pick.randint(1, 14))) for _ in range(n)]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_rows_are_filled_evenly_and_hold_every_text_once():
    lengths = [25, 3, 17, 9, 9, 12, 4, 30, 2, 8]  # 119 tokens
    rows = plan_rows(lengths, 40)
    assert sorted(i for row in rows for i in row) == list(range(10))
    fills = sorted(sum(lengths[i] for i in row) for row in rows)
    assert len(rows) == 3 and fills == [38, 40, 41]  # ceil(119 / 40) rows, filled within a few tokens
    assert plan_rows([50, 3], 16) == [[0], [1]]  # a text longer than a row gets a row of its own length


def test_packed_batches_are_a_multiple_of_workers_even_and_capped():
    lengths = [11, 9, 14, 7, 10, 12, 8, 13, 6, 10]  # 100 tokens
    batches = plan_packed_batches(lengths, max_batch_tokens=1024, max_batch=512, workers=2)
    assert len(batches) == 2 and [sum(lengths[i] for i in b) for b in batches] == [50, 50]
    batches = plan_packed_batches(lengths, max_batch_tokens=30, max_batch=512, workers=1)
    assert len(batches) == 4 and max(sum(lengths[i] for i in b) for b in batches) <= 30
    batches = plan_packed_batches(lengths, max_batch_tokens=1024, max_batch=3, workers=1)
    assert sorted(map(len, batches)) == [2, 2, 3, 3]
    assert sorted(i for b in batches for i in b) == list(range(10))


def test_pack_restarts_positions_and_gives_collates_masks():
    ids = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    prefixes = [2, 0, 1]
    batch = pack(ids, prefixes, pad_id=0, row_tokens=6)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [8, 9, 10, 6, 7]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert batch.segments.tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]]
    _, attention, pool = collate(ids, prefixes, pad_id=0)
    assert torch.equal(batch.attention_mask, attention) and torch.equal(batch.pool_mask, pool)
    flat = batch.input_ids.reshape(-1)[batch.gather]
    assert flat[attention.bool()].tolist() == [t for seq in ids for t in seq]


def test_a_shared_prefix_opens_each_row_once_and_every_text_of_the_row_sees_it(stories):
    ids = [[1, 2, 3, 4, 5], [1, 2, 6, 7], [1, 2, 8]]
    causal = stories[("causal", "sdpa")].backbone
    assert shared_prefix_length(causal, ids) == 2
    assert shared_prefix_length(causal, [[1, 2], [1, 2, 3]]) == 1  # each text keeps a token of its own
    assert shared_prefix_length(stories[("bidirectional", "sdpa")].backbone, ids) == 0  # the prefix would see texts
    batch = pack(ids, [0, 0, 0], pad_id=0, row_tokens=7, shared_prefix=2)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [1, 2, 6, 7, 8]]  # 10 tokens run instead of 12
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 2]]
    assert batch.segments.tolist() == [[-1, -1, 0, 0, 0], [-1, -1, 0, 0, 1]]
    _, attention, pool = collate(ids, [0, 0, 0], pad_id=0)
    assert torch.equal(batch.attention_mask, attention) and torch.equal(batch.pool_mask, pool)
    flat = batch.input_ids.reshape(-1)[batch.gather]
    assert flat[attention.bool()].tolist() == [t for seq in ids for t in seq]
    mask = block_diagonal_mask(causal, batch.segments)[1, 0]  # sdpa: True = may attend
    assert mask[4].tolist() == [True, True, False, False, True]  # token 8 sees the prefix and itself
    assert mask[3].tolist() == [True, True, True, True, False]  # 7 sees the prefix, 6 and itself


@pytest.fixture(scope="module")
def stories(stories_path):
    return {(mode, impl): Embedder.from_pretrained(stories_path, attention=mode, attn_implementation=impl,
                                                   dtype="float32", max_length=64)
            for mode in ("causal", "bidirectional") for impl in ("sdpa", "eager")}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
@pytest.mark.parametrize("pooling", pooling_names())
def test_packed_vectors_equal_padded_for_every_pooling_and_mode(stories, stories_path, pooling, mode, impl):
    base = stories[(mode, impl)]
    torch.manual_seed(0)
    embedder = Embedder.from_pretrained(stories_path, backbone=base.backbone, tokenizer=base.tokenizer,
                                        attention=mode, pooling=pooling, max_length=64)
    texts = random_texts(23)
    assert packing_blocker(embedder, 64) is None
    for instruction in (None, "Represent this story: "):
        padded = embedder.encode(texts, instruction=instruction)
        packed = embedder.encode(texts, instruction=instruction, packed=True, max_batch_tokens=96)
        assert cosines(padded, packed).min() >= 0.9999


@pytest.mark.parametrize(("arch", "impl"), arch_impl_cases())
def test_packed_states_equal_padded_across_architectures(arch, impl):
    model, tokenizer = tiny_model(arch, impl)
    for mode in ("causal", "bidirectional"):
        embedder = Embedder.from_pretrained(arch, backbone=model, tokenizer=tokenizer, attention=mode)
        assert packing_blocker(embedder, 32) is None, (arch, impl, mode)
        texts = random_texts(9, seed=1)
        padded = embedder.encode(texts)
        packed = embedder.encode(texts, packed=True)
        assert cosines(padded, packed).min() >= 0.9999, (arch, impl, mode)
    embedder.set_attention("causal")


def test_what_cannot_be_packed_falls_back_to_padding(stories_path, stories):
    base = stories[("causal", "sdpa")]
    embedder = Embedder.from_pretrained(stories_path, backbone=base.backbone, tokenizer=base.tokenizer,
                                        max_length=64)
    embedder.attention_bias = soft_mask_bias(0.5)
    assert packing_blocker(embedder, 10) == "an attention bias is defined per padded position"
    texts = random_texts(6)
    assert np.array_equal(embedder.encode(texts, packed=True), embedder.encode(texts))
    embedder.attention_bias = None

    embedder.backbone.config.sliding_window = 8
    try:
        assert packing_blocker(embedder, 9) == ("texts longer than the sliding window (8 tokens) need the model's "
                                                "own window mask")
        assert packing_blocker(embedder, 8) is None
    finally:
        del embedder.backbone.config.sliding_window


def test_token_prepending_falls_back_to_padding(stories_path):
    embedder = Embedder.from_pretrained(stories_path, dtype="float32", max_length=64)
    enable_token_prepending(embedder, start_layer=1, end_layer=2)
    assert packing_blocker(embedder, 10) == "a forward hook (e.g. Token Prepending, GEM) changes how the backbone runs"
    texts = random_texts(5)
    assert np.array_equal(embedder.encode(texts, packed=True), embedder.encode(texts))


def tiny_gpt2():
    """GPT-2 has learned absolute positions: packed texts are right only if their positions restart at 0."""
    tokenizer = tokenizer_for("gpt2")
    config = AutoConfig.for_model("gpt2", vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128)
    torch.manual_seed(0)
    return AutoModel.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval(), tokenizer


def test_a_model_that_ignores_position_ids_is_not_packed(monkeypatch):
    model, tokenizer = tiny_gpt2()
    embedder = Embedder.from_pretrained("gpt2", backbone=model, tokenizer=tokenizer)
    texts = random_texts(7)
    assert packing_blocker(embedder, 10) is None
    assert cosines(embedder.encode(texts), embedder.encode(texts, packed=True)).min() >= 0.9999

    model, tokenizer = tiny_gpt2()  # a new model: the probe's verdict is kept per model
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, position_ids=None, **k: forward(self, *a, **k))
    embedder = Embedder.from_pretrained("gpt2", backbone=model, tokenizer=tokenizer)
    assert packing_blocker(embedder, 10) == ("the model's packed forward differs from its padded one (it ignores "
                                             "position ids or 4-D masks)")
    assert np.array_equal(embedder.encode(texts, packed=True), embedder.encode(texts))


def test_the_server_packs_when_the_model_allows(stories_path):
    embedder = Embedder.from_pretrained(stories_path, dtype="float32", max_length=64, attention="bidirectional")
    padded = embedder.encode(texts := random_texts(9))
    call = ModelCall.build(embedder, packed=False, max_batch_tokens=None, workers=2)
    assert (call.packed, call.max_batch_tokens) == (False, 256)
    assert embedder.backbone.config._attn_implementation == "sdpa"  # padded forwards keep sdpa
    call = ModelCall.build(embedder, packed=True, max_batch_tokens=None, workers=2)
    assert (call.packed, call.max_batch_tokens) == (True, 1024)
    # packed on CPU: eager attention (faster on 4-D masks), the mode re-probed, the same vectors
    assert embedder.backbone.config._attn_implementation == "eager"
    assert attn.get_mode(embedder.backbone) == "bidirectional"
    assert cosines(padded, call(embedder.tokenize(texts))).min() >= 0.9999
    enable_token_prepending(embedder, start_layer=1, end_layer=2)
    call = ModelCall.build(embedder, packed=True, max_batch_tokens=300, workers=2)
    assert (call.packed, call.max_batch_tokens) == (False, 300)
    tokenized = Tokenized(embedder.tokenize(random_texts(4)).ids, [0] * 4)
    assert call(tokenized).shape == (4, embedder.dimension)


def test_packed_equals_padded_on_the_real_smollm2():
    embedder = Embedder.from_pretrained("smollm2-135m", dtype="float32", max_length=128)
    texts = random_texts(40, seed=3)
    assert packing_blocker(embedder, 128) is None
    padded = embedder.encode(texts)
    assert cosines(padded, embedder.encode(texts, packed=True, max_batch_tokens=256)).min() >= 0.9999
    # bf16 (the served dtype here): sdpa's bf16 kernel rounds differently over a longer row (0.99987 on these
    # texts; eager attention gives 0.999998), and the packed vectors are as close to float32 as the padded ones
    embedder.backbone.to(torch.bfloat16)
    padded16 = embedder.encode(texts)
    packed16 = embedder.encode(texts, packed=True, max_batch_tokens=256)
    assert cosines(padded16, packed16).min() >= 0.9998
    assert (1 - cosines(packed16, padded)).mean() <= 1.05 * (1 - cosines(padded16, padded)).mean()
