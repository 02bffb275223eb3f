"""GEM: the mask blocks the copy from the text (information flows only through the special tokens), labels,
token dropout, the learnable scale, the loss switch, the embedding hook with save / load, and perplexity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from embedkit import Embedder
from embedkit import attention as attn
from embedkit.backbone import decoder_layers, load_tokenizer
from embedkit.methods import gem
from embedkit.methods.common import add_tokens

TEXTS = ["Once upon a time there was a little dog", "The cat sat on the mat", "Lily liked to play"]


def test_mask_blocks_the_copy_from_the_text():
    ids, segments = gem.build_row([11, 12, 13], [90, 91], [11, 12, 13])
    allowed = gem.gem_allowed(torch.tensor([segments]), torch.ones(1, len(ids), dtype=torch.long))[0]
    prefix, special, suffix = [0, 1, 2], [3, 4], [5, 6, 7]
    for q in range(len(ids)):
        for k in range(len(ids)):
            expected = k <= q  # causal
            if q in suffix and k in prefix:
                expected = False  # the copy never sees the text
            if q in special and k in special and q != k:
                expected = False  # isolated special tokens
            assert bool(allowed[q, k]) is expected, (q, k)
    shared = gem.gem_allowed(torch.tensor([segments]), torch.ones(1, len(ids), dtype=torch.long),
                             isolate_special_tokens=False)[0]
    assert shared[4, 3] and not shared[5, 0]


def test_padding_keys_are_blocked_and_no_row_is_empty():
    rows = [gem.build_row([5, 6], [90], [5, 6]), gem.build_row([5], [90])]
    ids, mask, segments, _ = gem.pad_rows(rows, pad_id=0)
    allowed = gem.gem_allowed(segments, mask)
    assert not allowed[1, :, 2:][:2].any()  # real queries of row 1 never see its padding
    assert allowed.any(-1).all()


@pytest.fixture(scope="module")
def stories_lm(stories_path):
    model = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(stories_path))
    special_ids, _ = add_tokens(tokenizer, model, gem.special_tokens(1))
    return model, tokenizer, special_ids


def run_copy(model, tokenizer, special_ids, text, copy, *, use_gem_mask, forced=None):
    """Hidden states of ``text <s> copy``; ``forced`` replaces the special token's per-layer inputs."""
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    copy_ids = tokenizer(copy, add_special_tokens=False)["input_ids"]
    ids, segments = gem.build_row(text_ids, special_ids, copy_ids)
    ids, mask, segments, _ = gem.pad_rows([(ids, segments)], tokenizer.pad_token_id)
    base = model.get_decoder()
    bias = gem.gem_bias(segments) if use_gem_mask else None
    where = int((segments[0] == gem.SPECIAL).nonzero()[0])
    recorded, handles = [], []
    for index, layer in enumerate(decoder_layers(base)):
        def hook(module, args, kwargs, index=index):
            hidden = args[0] if args else kwargs["hidden_states"]
            if forced is None:
                recorded.append(hidden[0, where].clone())
                return None
            hidden = hidden.clone()
            hidden[0, where] = forced[index]
            return ((hidden,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            out = base(**attn.model_inputs(base, ids, mask, bias), use_cache=False).last_hidden_state[0]
    finally:
        for handle in handles:
            handle.remove()
    return out[segments[0] == gem.SUFFIX], recorded


def test_information_reaches_the_copy_only_through_the_special_tokens(stories_lm):
    """Two different texts, same copy: once the special token's states are made equal in every layer, the
    copy's states are identical under the GEM mask, and still differ under plain causal attention."""
    model, tokenizer, special_ids = stories_lm
    a, b, copy = "Once upon a time there was a dog", "The sun was hot and the sea was blue", "a dog"
    for use_gem_mask in (True, False):
        copy_a, recorded = run_copy(model, tokenizer, special_ids, a, copy, use_gem_mask=use_gem_mask)
        copy_b, _ = run_copy(model, tokenizer, special_ids, b, copy, use_gem_mask=use_gem_mask, forced=recorded)
        gap = float((copy_a - copy_b).abs().max())
        if use_gem_mask:
            assert gap < 1e-5, gap
        else:
            assert gap > 1e-3, gap
    free_b, _ = run_copy(model, tokenizer, special_ids, b, copy, use_gem_mask=True)
    assert float((copy_a - free_b).abs().max()) > 1e-3  # without forcing, the text does reach the copy


def test_ntp_labels_skip_special_targets():
    ids, segments = gem.build_row([1, 2], [90, 91], [3, 4])
    assert gem.ntp_labels(ids, segments) == [2, -100, -100, 3, 4, -100]
    plain, plain_segments = gem.build_row([1, 2, 3], [])
    assert gem.ntp_labels(plain, plain_segments) == [2, 3, -100]


def test_token_dropout_and_split_rows():
    rng = np.random.default_rng(0)
    ids = list(range(100))
    kept = gem.token_dropout(ids, 0.2, rng)
    assert 60 < len(kept) < 95 and kept == sorted(kept) and set(kept) <= set(ids)
    assert len(gem.token_dropout([7], 0.99, rng)) == 1
    row, segments = gem.reconstruction_row([1, 2, 3, 4], [90], np.random.default_rng(1), "split")
    assert 90 in row and segments.count(gem.SPECIAL) == 1
    assert [t for t, s in zip(row, segments, strict=True) if s != gem.SPECIAL] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="copy, split"):
        gem.reconstruction_row([1], [90], rng, "mirror")


def test_scale_loss_and_switch():
    scale = gem.LearnableScale()
    assert float(scale().detach()) == 20.0
    with torch.no_grad():
        scale.value.fill_(150.0)
    assert float(scale().detach()) == 100.0
    with torch.no_grad():
        scale.value.fill_(20.0)
    q = torch.randn(4, 8)
    loss = gem.contrastive_loss(q, q + 0.01 * torch.randn(4, 8), scale())
    loss.backward()
    assert scale.value.grad is not None and float(loss) < 0.5
    assert [gem.loss_weight(s, switch_step=100) for s in (0, 99, 100, 500)] == [0.0, 0.0, 1.0, 1.0]
    assert gem.loss_weight(3, switch_step=0, weight_after=0.3) == 0.3


def test_embedding_is_the_special_tokens_state_and_survives_save_load(stories_path, tmp_path):
    embedder = Embedder.from_pretrained(stories_path, dtype="float32")
    gem.enable_gem(embedder, num_special_tokens=2)
    vectors = embedder.encode(TEXTS, normalize=False, padding_side="left")
    right = embedder.encode(TEXTS, normalize=False, padding_side="right")
    np.testing.assert_allclose(vectors, right, atol=1e-5)
    # by hand: text + both specials, GEM mask, mean of the specials' final states
    special_ids = embedder.tokenizer.convert_tokens_to_ids(gem.special_tokens(2))
    ids = embedder.tokenize([TEXTS[0]]).ids[0]
    row = gem.build_row(ids, special_ids)
    t_ids, mask, segments, _ = gem.pad_rows([row], embedder.tokenizer.pad_token_id)
    with torch.inference_mode():
        hidden = embedder.backbone(**attn.model_inputs(embedder.backbone, t_ids, mask, gem.gem_bias(segments)),
                                   use_cache=False).last_hidden_state
    np.testing.assert_allclose(vectors[0], gem.special_states(hidden, segments)[0].numpy(), atol=1e-5)
    embedder.save(tmp_path / "gem")
    assert json.loads((tmp_path / "gem" / "embedkit.json").read_text())["methods"]["gem"]["num_special_tokens"] == 2
    loaded = Embedder.load(tmp_path / "gem")
    np.testing.assert_allclose(loaded.encode(TEXTS, normalize=False), vectors, atol=1e-5)


def test_perplexity_matches_the_loss(stories_lm, data_dir):
    model, tokenizer, _ = stories_lm
    text = "Once upon a time there was a little girl named Lily."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        loss = model(input_ids=ids, labels=ids).loss
    assert gem.perplexity(model, tokenizer, [text]) == pytest.approx(float(torch.exp(loss)), rel=1e-4)
    stories = (data_dir / "unlabeled" / "TinyStories" / "sentences.txt").read_text().splitlines()[:40]
    in_domain = gem.perplexity(model, tokenizer, stories)
    assert 1 < in_domain < 100  # stories260K models its own domain well (vocab 512)
