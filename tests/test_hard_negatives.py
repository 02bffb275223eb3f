"""Dynamic hard-negative mining: Conan's replacement rule, and the pool that feeds it from the loss's scores."""

from __future__ import annotations

import math

import pytest
import torch

from embedkit.train.negatives import DynamicNegatives, MinerSettings, too_easy


@pytest.mark.parametrize("s0,st,expected", [
    (0.30, 0.30, True),   # never was hard
    (0.39, 0.90, True),
    (0.80, 0.60, True),   # fell by more than 1.2x and is below 0.7
    (0.80, 0.70, False),  # 1.2 * 0.70 = 0.84 >= 0.80: not fallen enough
    (0.90, 0.72, False),  # fallen enough but still >= 0.7
    (0.50, 0.50, False),
    (0.40, 0.10, True),   # S0 exactly at the floor: only the fall counts
])
def test_replacement_rule(s0, st, expected):
    assert too_easy(s0, st) is expected


def test_rule_thresholds_are_settings():
    assert too_easy(0.5, 0.5, floor=0.6)
    assert not too_easy(0.8, 0.6, ratio=1.5)
    assert not too_easy(0.8, 0.6, ceiling=0.5)


def unit(cos: float) -> torch.Tensor:
    """A 2-D unit vector with cosine ``cos`` to the anchor direction (1, 0)."""
    return torch.tensor([cos, math.sqrt(max(0.0, 1 - cos * cos))])


ANCHOR = torch.tensor([[1.0, 0.0]])


def miner(**settings) -> DynamicNegatives:
    return DynamicNegatives([["neg0"]], positives=["pos0"], anchors=["anc0"], k=1,
                            settings=MinerSettings(**settings))


def observe(m: DynamicNegatives, positive: float, negative: float, batch_positives=(), batch_negatives=()):
    """One step for row 0, with other rows' texts in the batch given as (text, cosine to anchor 0)."""
    m.positives += [t for t, _ in batch_positives]
    m.anchors += [f"other{i}" for i in range(len(batch_positives))]
    # the other rows: their own anchors are orthogonal, only row 0's scores matter here
    p = torch.stack([unit(positive)] + [unit(c) for _, c in batch_positives])
    n = torch.stack([unit(negative)] + [unit(c) for _, c in batch_negatives])
    others = len(batch_positives)
    for text, _ in batch_negatives:
        m.state.append(type(m.state[0])(active=[type(m.state[0].active[0])(text)], used={text}))
    anchors = torch.cat([ANCHOR, torch.tensor([[0.0, 1.0]]).repeat(others, 1)])
    return m.observe([0] + list(range(len(m.state) - others, len(m.state))), anchors, p, n)


def test_negative_replaced_once_its_score_falls():
    m = miner()
    # step 1: S0 = 0.8, in-batch candidates scored 0.75 (best) and 0.5 enter the pool
    assert observe(m, 0.95, 0.80, [("posA", 0.5)], [("negA", 0.75)]) == 0
    assert m.state[0].active[0].s0 == pytest.approx(0.8)
    assert m.select([0]) == [["neg0"]]
    assert set(m.state[0].pool) == {"posA", "negA"}
    # step 2: same negative now at 0.6 -> 1.2 * 0.6 < 0.8 and 0.6 < 0.7: replaced by the best candidate
    replaced = m.observe([0], ANCHOR, unit(0.95)[None], unit(0.6)[None])
    assert replaced == 1
    assert m.select([0]) == [["negA"]]
    assert m.state[0].active[0].s0 is None  # measured when the loss first scores it
    m.observe([0], ANCHOR, unit(0.95)[None], unit(0.72)[None])
    assert m.state[0].active[0].s0 == pytest.approx(0.72)
    assert m.select([0]) == [["negA"]]


def test_negative_that_was_never_hard_is_replaced_at_first_sight():
    m = miner()
    assert observe(m, 0.9, 0.3, [("posA", 0.6)], [("negA", 0.5)]) == 1
    assert m.select([0]) == [["posA"]]  # the best candidate (0.6) wins


def test_no_candidate_keeps_the_negative():
    m = miner(from_batch=False)
    assert m.observe([0], ANCHOR, unit(0.9)[None], unit(0.2)[None]) == 0
    assert m.select([0]) == [["neg0"]]


def test_pool_keeps_out_false_negatives_own_positive_and_used_texts():
    m = miner()
    observe(m, 0.80, 0.78, [("too_close", 0.79), ("pos0", 0.5)], [("neg0", 0.7), ("fine", 0.6)])
    # too_close: 0.79 >= 0.95 * 0.80 (likely a paraphrase); pos0: own positive; neg0: already used
    assert set(m.state[0].pool) == {"fine"}


def test_pool_size_keeps_the_best():
    m = miner(pool_size=2)
    observe(m, 0.99, 0.9, [("a", 0.3), ("b", 0.6), ("c", 0.5)], [("d", 0.55), ("e", 0.1), ("f", 0.2)])
    assert set(m.state[0].pool) == {"b", "d"}


def test_extra_data_negatives_come_first_and_settings_are_checked():
    m = DynamicNegatives([["n0", "n1"]], positives=["p"], anchors=["a"], k=1)
    m.observe([0], ANCHOR, unit(0.9)[None], unit(0.1)[None])
    assert m.select([0]) == [["n1"]]
    with pytest.raises(ValueError, match="Unknown mining settings"):
        MinerSettings.from_dict({"threshold": 1})
    with pytest.raises(ValueError, match="needs 2 negatives"):
        DynamicNegatives([["n0"]], positives=["p"], anchors=["a"], k=2)
