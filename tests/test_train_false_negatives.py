"""False negatives in InfoNCE: in-batch duplicates (same positive text, same anchor text) and the margin rule are
left out of an anchor's softmax, checked against the loss computed by hand without those candidates, in both
directions of the symmetric loss; and processes holding different numbers of hard negatives (a batch mixing pairs
and triplets) give the one-process loss and gradients."""

from __future__ import annotations

import hashlib
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from gloo import assert_processes_match_one

from embedkit.train.losses import FalseNegatives, info_nce, text_keys
from embedkit.train.objectives.supervised import Supervised, SupervisedConfig

T = 0.05


def by_hand(a, docs, keep: list[list[int]]) -> torch.Tensor:
    """Sum over anchors of cross-entropy over the kept candidates only (the target is candidate i)."""
    scores = F.normalize(a, dim=-1) @ F.normalize(docs, dim=-1).T / T
    total = torch.zeros(())
    for i, cols in enumerate(keep):
        total = total + F.cross_entropy(scores[i, cols][None], torch.tensor([cols.index(i)]), reduction="sum")
    return total


def test_text_keys_are_stable_and_equal_for_equal_texts():
    keys = text_keys(["x", "y", "x"])
    assert keys[0] == keys[2] != keys[1]
    # not Python's hash() (salted per process): every process must give a text the same key
    assert keys[1].item() == int.from_bytes(hashlib.blake2b(b"y", digest_size=8).digest(), "little", signed=True)


def test_duplicate_positives_anchors_and_negatives_are_left_out():
    torch.manual_seed(0)
    a, p, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(2, 8)
    anchors, positives, negatives = ["q", "q", "r", "s"], ["x", "y", "x", "z"], ["w", "z"]
    rule = FalseNegatives(text_keys(anchors), text_keys(positives), text_keys(negatives), counts={})
    got = info_nce(a, p, n, temperature=T, false_negatives=rule)
    # candidates 0-3 the positives, 4-5 the negatives
    keep = [[0, 3, 4, 5],  # 2: same positive text 'x'; 1: same anchor 'q'
            [1, 2, 3, 4, 5],  # 0: same anchor 'q'
            [1, 2, 3, 4, 5],  # 0: same positive text 'x'
            [0, 1, 2, 3, 4]]  # 5: a hard negative equal to its positive 'z'
    assert torch.allclose(got, by_hand(a, torch.cat([p, n]), keep), atol=1e-5)
    assert rule.counts == {"duplicates": 5, "margin": 0}
    off = FalseNegatives(text_keys(anchors), text_keys(positives), text_keys(negatives), duplicates=False)
    assert torch.equal(info_nce(a, p, n, temperature=T, false_negatives=off), info_nce(a, p, n, temperature=T))


def test_the_reversed_rule_leaves_out_the_positives_side_duplicates():
    torch.manual_seed(6)
    a, p = torch.randn(4, 8), torch.randn(4, 8)
    rule = FalseNegatives(text_keys(["q", "q", "r", "s"]), text_keys(["x", "y", "x", "z"]), counts={})
    got = info_nce(p, a, temperature=T, false_negatives=rule.reversed())
    # each positive against anchors 0-3 (the target: its own row's anchor)
    keep = [[0, 3],  # 1: the same anchor text 'q'; 2: the anchor of a row with the same positive 'x'
            [1, 2, 3],  # 0: the same anchor text 'q'
            [1, 2, 3],  # 0: the anchor of a row with the same positive 'x'
            [0, 1, 2, 3]]
    assert torch.allclose(got, by_hand(p, a, keep), atol=1e-5)
    assert rule.counts == {}  # the report counts the anchors' direction only


def test_symmetric_supervised_loss_is_the_mean_of_both_directions():
    torch.manual_seed(7)
    a, p, n = torch.randn(3, 8), torch.randn(3, 8), torch.randn(1, 8)
    rule = FalseNegatives(text_keys(["q", "q", "r"]), text_keys(["x", "y", "z"]), text_keys(["y"]))
    config = SupervisedConfig(data={"paths": ["x"]}, steps=1, temperature=T, symmetric=True)
    got = Supervised(config, SimpleNamespace()).info_nce(a, p, n, rule)
    forward = by_hand(a, torch.cat([p, n]), [[0, 2, 3], [1, 2], [0, 1, 2, 3]])  # 'q' twice; 3 is row 1's positive
    backward = by_hand(p, a, [[0, 2], [1, 2], [0, 1, 2]])  # the hard negative is no candidate backwards
    assert torch.allclose(got, (forward + backward) / 2, atol=1e-5)
    one_way = Supervised(config.model_copy(update={"symmetric": False}), SimpleNamespace())
    assert torch.equal(one_way.info_nce(a, p, n, rule), info_nce(a, p, n, temperature=T, false_negatives=rule))


def test_without_duplicates_the_loss_is_unchanged_bit_for_bit():
    torch.manual_seed(1)
    a, p, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    rule = FalseNegatives(text_keys("abcd"), text_keys("efgh"), text_keys("ijkl"))
    assert torch.equal(info_nce(a, p, n, temperature=T, false_negatives=rule), info_nce(a, p, n, temperature=T))


def test_margin_drops_negatives_scoring_above_the_positive_by_more_than_the_margin():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[0.6, 0.8], [0.0, 1.0]])  # anchor 0's positive: cosine 0.6
    n = torch.tensor([[1.0, 0.05], [0.8, 0.6]])  # cosines to anchor 0: 0.9988, 0.8
    counts: dict[str, int] = {}
    rule = FalseNegatives(text_keys("ab"), text_keys("cd"), text_keys("ef"), margin=0.3, counts=counts)
    got = info_nce(a, p, n, temperature=T, false_negatives=rule)
    keep = [[0, 1, 3],  # 2 scores 0.9988 > 0.6 + 0.3; 3 (0.8) stays
            [0, 1, 2, 3]]  # anchor 1's positive scores 1: nothing above it
    assert torch.allclose(got, by_hand(a, torch.cat([p, n]), keep), atol=1e-5)
    assert counts == {"duplicates": 0, "margin": 1}


ANCHORS, POSITIVES, NEGATIVES = ["q", "r", "q", "s"], ["x", "y", "z", "x"], ["w", "y", "v"]


def _loss(a, p, n, anchors, positives, negatives, w):
    rule = FalseNegatives(text_keys(anchors), text_keys(positives), text_keys(negatives))
    return info_nce(a @ w, p @ w, n @ w, temperature=T, false_negatives=rule) + \
        info_nce(p @ w, a @ w, temperature=T, false_negatives=rule.reversed())  # the symmetric loss's other side


def _shard_loss(a, p, n, rank, world, w):
    rows = slice(2 * rank, 2 * rank + 2)
    negs = slice(0, 3) if rank == 0 else slice(3, 3)  # rank 0: triplets; rank 1: pairs (no negatives)
    return [_loss(a[rows], p[rows], n[negs], ANCHORS[rows], POSITIVES[rows], NEGATIVES[negs], w)]


def test_processes_with_different_negative_counts_give_the_one_process_loss_in_both_directions():
    torch.manual_seed(3)
    a, p, n = torch.randn(4, 6), torch.randn(4, 6), torch.randn(3, 6)
    weight = torch.randn(6, 6)
    w = weight.clone().requires_grad_(True)
    single = _loss(a, p, n, ANCHORS, POSITIVES, NEGATIVES, w)
    assert_processes_match_one(partial(_shard_loss, a, p, n), [single], weight, w)
