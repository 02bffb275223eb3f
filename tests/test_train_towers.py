"""Contrastive towers run together, sorted by length or packed: less padding, same embeddings, loss and
gradients."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from test_train_helpers import tiny_recipe

import embedkit.train.objectives.contrastive as contrastive
from embedkit import packing
from embedkit.batching import Tokenized, collate
from embedkit.train.recipe import load_recipe
from embedkit.train.towers import TowerRows, draws_dropout, least_padding_split, sorted_forward
from embedkit.train.trainer import Trainer, backward


class RecordingEmbedder:
    """Embeds a text as [sum of its ids, its length, its instruction length]; records each batch's padded shape."""

    def __init__(self):
        self.shapes = []

    def collate(self, tokenized, rows=None):
        rows = range(len(tokenized)) if rows is None else rows
        return collate([tokenized.ids[i] for i in rows], [tokenized.prefix_lengths[i] for i in rows], pad_id=0)

    def __call__(self, input_ids, attention_mask, pool_mask):
        self.shapes.append(tuple(input_ids.shape))
        prefix = attention_mask.sum(1) - pool_mask.sum(1)
        return torch.stack([input_ids.sum(1), attention_mask.sum(1), prefix], 1).float()


def test_towers_share_length_sorted_batches_and_come_back_in_order():
    emb = RecordingEmbedder()
    anchors = Tokenized([[1] * 9, [2] * 2, [3] * 8, [4] * 3], [2, 0, 0, 1])
    others = Tokenized([[5] * 2, [6] * 9, [7] * 3, [8] * 8], [0, 0, 0, 0])
    towers = [(TowerRows(emb, anchors, [0, 1, 2, 3]), 4), (TowerRows(emb, others, [3, 2, 1, 0]), 4)]
    separate = [fn(range(n)) for fn, n in towers]
    assert emb.shapes == [(4, 9), (4, 9)]  # each tower padded to its longest text: 72 cells for 44 tokens
    emb.shapes.clear()
    together = sorted_forward(towers)
    assert emb.shapes == [(4, 3), (4, 9)]  # lengths 2 2 3 3 | 8 8 9 9: 48 cells
    for got, want in zip(together, separate, strict=True):
        torch.testing.assert_close(got, want)


def test_split_puts_the_cuts_where_the_fewest_padding_cells_fall():
    assert least_padding_split([1, 2, 3, 40], 2) == [(0, 3), (3, 4)]  # 3 x 3 + 40 cells (equal halves: 84)
    assert least_padding_split([5, 5, 5], 3) == [(0, 3)]  # no cut where it saves nothing
    assert least_padding_split([1, 2, 3, 40], 1) == [(0, 4)]
    rng = random.Random(1)
    for _ in range(300):  # against every way to cut
        lengths, parts = sorted(rng.randint(1, 12) for _ in range(rng.randint(1, 9))), rng.randint(1, 4)
        got = least_padding_split(lengths, parts)

        def cells(runs, lengths=lengths):
            return sum((stop - start) * lengths[stop - 1] for start, stop in runs)
        best = min(cells(list(zip((0, *cut), (*cut, len(lengths)), strict=True))) for n in range(parts)
                   for cut in itertools.combinations(range(1, len(lengths)), n))
        assert cells(got) == best and len(got) <= parts
        assert got[0][0] == 0 and [a for a, _ in got[1:]] == [b for _, b in got[:-1]] and got[-1][1] == len(lengths)


def test_towers_that_are_not_whole_tower_rows_run_on_their_own():
    emb = RecordingEmbedder()
    tok = Tokenized([[1, 2], [3]], [0, 0])
    assert sorted_forward([(TowerRows(emb, tok, [0, 1]), 2), (lambda chunk: None, 2)]) is None
    assert sorted_forward([(TowerRows(emb, tok, [0, 1]), 1)]) is None
    assert emb.shapes == []


@pytest.mark.parametrize("mode", ["bidirectional", "causal"])
def test_supervised_loss_and_gradients_match_one_pass_per_tower(tmp_path, monkeypatch, mode):
    """The tiny model in float32, no dropout: the packed pass (the default) and the sorted shared pass give the loss
    and adapter gradients of one pass per tower (GradCache with a chunk per tower runs the towers one by one).
    Causal under a template, the packed rows compute the texts' shared head once."""
    model = {"attention": "causal", "pooling": "last", "template": 'Say "{text}" in one word:"'} \
        if mode == "causal" else {}
    objective, peft_model = _tiny_supervised(tmp_path, lora_dropout=0.0, **model)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    shared = []
    real = packing.shared_prefix_length
    monkeypatch.setattr(packing, "shared_prefix_length", lambda *a: shared.append(real(*a)) or shared[-1])
    results = []
    for packed, mini_batch in ((True, None), (False, None), (True, 4)):
        objective.config = objective.config.model_copy(update={"mini_batch_size": mini_batch, "packed": packed})
        peft_model.zero_grad(set_to_none=True)
        loss = backward(objective.loss([0, 1, 2, 3], step=0))
        results.append((loss, {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}))
    assert shared == ([4] if mode == "causal" else [0])  # one packed pass; <s> and the template's head, 3 tokens
    (tower_loss, tower_grads) = results[-1]
    assert tower_loss > 0
    for loss, grads in results[:-1]:
        assert abs(loss - tower_loss) <= 1e-5 * tower_loss  # float32 rounding of cosines, times 1/temperature (50)
        for name, grad in tower_grads.items():  # float32 rounding: ~1e-5 of the norm (the prefix's sums differ)
            assert (grads[name] - grad).norm() <= 1e-4 * grad.norm(), name


def _tiny_supervised(tmp_path, lora_dropout: float, **model):
    recipe = tiny_recipe(tmp_path / "data", tmp_path / "run")
    recipe["lora"]["dropout"] = lora_dropout
    recipe["model"].update(model)
    if "template" in model:  # the anchors' instruction would end the prefix all texts share after the first token
        del recipe["stages"][2]["instruction"]
    trainer = Trainer(load_recipe(recipe), resume=False)
    trainer.load_model()
    objective, peft_model = trainer.start_stage(2)
    objective.prepare()
    trainer.embedder.train()
    return objective, peft_model


def test_with_dropout_the_towers_sort_together_only_when_asked(tmp_path, monkeypatch):
    """Dropout masks would come in another order (so older runs' numbers would change): ``auto`` keeps one pass per
    tower when the forward draws dropout, ``always`` sorts anyway, ``off`` never sorts."""
    calls = []
    real = contrastive.sorted_forward
    monkeypatch.setattr(contrastive, "sorted_forward",
                        lambda towers, **kw: calls.append(len(towers)) or real(towers, **kw))
    objective, peft_model = _tiny_supervised(tmp_path, lora_dropout=0.1)
    assert draws_dropout(peft_model)
    for setting, sorted_calls in (("auto", []), ("always", [3]), ("off", [])):
        calls.clear()
        objective.config = objective.config.model_copy(update={"sort_by_length": setting})
        backward(objective.loss([0, 1, 2, 3], step=0))
        assert calls == sorted_calls, setting
    peft_model.eval()
    assert not draws_dropout(peft_model)


def test_attention_dropout_counts_as_dropout():
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaModel(config).train()
    assert not draws_dropout(model)
    model.layers[0].self_attn.attention_dropout = 0.1
    assert draws_dropout(model)
