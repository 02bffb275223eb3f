"""Contrastive loss, cross-process gathering with gradients, and GradCache equivalence."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from gloo import assert_processes_match_one

from embedkit.train.losses import contrastive_loss, tower_loss


def run_towers(towers, loss_fn, mini_batch_size):
    """What the trainer does with a tower loss: backward, then GradCache's second pass."""
    loss, finish = tower_loss(towers, loss_fn, mini_batch_size)
    loss.backward()
    if finish is not None:
        finish()
    return float(loss.detach())


def reference_loss(a, p, n, temperature):
    docs = torch.cat([p, n]) if n is not None else p
    scores = F.normalize(a, dim=-1) @ F.normalize(docs, dim=-1).T / temperature
    return F.cross_entropy(scores, torch.arange(len(a)))


def test_contrastive_loss_matches_infonce_by_hand():
    torch.manual_seed(0)
    a, p, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(8, 8)
    assert torch.allclose(contrastive_loss(a, p, n, 0.05), reference_loss(a, p, n, 0.05), atol=1e-6)
    # identical anchor and positive, orthogonal others: loss ~ 0
    eye = torch.eye(4, 8)
    assert contrastive_loss(eye, eye, None, 0.05).item() < 1e-6
    # and equals sentence-transformers' MultipleNegativesRankingLoss (scale 20 == temperature 0.05)
    from sentence_transformers.util import cos_sim

    st = F.cross_entropy(cos_sim(a, torch.cat([p, n])) * 20, torch.arange(4))
    assert torch.allclose(contrastive_loss(a, p, n, 0.05), st, atol=1e-5)


def _tiny_encoder(dropout: float):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Dropout(dropout), torch.nn.Linear(16, 16))


def _towers(model, data):
    def make(rows):
        def embed(chunk):
            return model(rows[list(chunk)]).mean(dim=1)
        return embed, len(rows)
    return [make(t) for t in data]


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_gradcache_gives_the_uncached_loss_and_gradients(chunk):
    model = _tiny_encoder(0.0)
    torch.manual_seed(2)
    data = [torch.randint(0, 50, (8, 5)), torch.randint(0, 50, (8, 5)), torch.randint(0, 50, (16, 5))]

    def loss_fn(a, p, n):
        return contrastive_loss(a, p, n, 0.02)

    loss_full = run_towers(_towers(model, data), loss_fn, None)
    grads_full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_cached = run_towers(_towers(model, data), loss_fn, chunk)
    assert abs(loss_full - loss_cached) < 1e-6
    for g_full, p in zip(grads_full, model.parameters(), strict=True):
        assert torch.allclose(g_full, p.grad, atol=1e-6)


def test_gradcache_repeats_dropout_masks():
    """With dropout on, the re-embedding pass must see the same masks as the no-grad pass."""
    model = _tiny_encoder(0.5)
    model.train()
    rows = torch.randint(0, 50, (6, 5))
    seen = []

    def embed(chunk):
        out = model(rows[list(chunk)]).mean(dim=1)
        seen.append(out.detach().clone())
        return out

    run_towers([(embed, 6), (embed, 6)], lambda a, b: contrastive_loss(a, b, None, 0.05), 2)
    first, second = seen[:6], seen[6:]
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(first[0], first[3])  # the two views differ (different dropout)


def _shard_loss(a, p, n, rank, world, w):
    k, nk = len(a) // world, len(n) // world
    sl = slice(rank * k, (rank + 1) * k)
    return [contrastive_loss(a[sl] @ w, p[sl] @ w, n[rank * nk:(rank + 1) * nk] @ w, 0.05)]


def test_gathered_negatives_give_single_process_loss_and_gradients():
    torch.manual_seed(3)
    a, p, n = torch.randn(8, 6), torch.randn(8, 6), torch.randn(8, 6)
    weight = torch.randn(6, 6)
    w = weight.clone().requires_grad_(True)
    single = contrastive_loss(a @ w, p @ w, n @ w, 0.05)
    assert_processes_match_one(partial(_shard_loss, a, p, n), [single], weight, w)
