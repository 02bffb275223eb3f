"""Hard negatives of the supervised objective: the selector registry, ``from_data`` (the default), and
``dynamic``: Conan-embedding-v2's mining, which swaps a hard negative out once it has become too easy.

A selector is registered with ``@register_negative_selector("name")`` on a factory ``(settings: dict) ->
callable(objective, rows) -> list[list[str]]`` giving each row's hard negatives; a selector with an ``observe``
method is handed the loss's embeddings after each loss, and one with ``stats`` reports at the stage's end.

Dynamic mining:

Every anchor keeps ``hard_negatives`` active negatives and a pool of candidates. The pool starts with the
row's negatives from the data and grows with the in-batch texts (other rows' positives and negatives) that
the current model scores closest to the anchor. All scores are the cosine similarities the contrastive loss
already computes: the supervised stage hands the selector its anchor / positive / negative embeddings after
each step (``observe``), so mining costs no extra forward pass.

The replacement rule, per active negative: ``S0`` is its score when first used, ``S_t`` its score now;
it is too easy, and replaced by the best-scored pool candidate, when

    S0 < floor (0.4)   or   (ratio (1.2) * S_t < S0  and  S_t < ceiling (0.7)).

A candidate enters the pool only if it is not the anchor or its positive and scores below
``false_negative_margin`` x the anchor-positive score (likely false negatives stay out).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from embedkit import distributed
from embedkit.io import StrictConfig

NEGATIVE_SELECTORS: dict[str, Callable] = {}


def register_negative_selector(name: str) -> Callable[[Callable], Callable]:
    def wrap(factory: Callable) -> Callable:
        NEGATIVE_SELECTORS[name] = factory
        return factory

    return wrap


@register_negative_selector("from_data")
def negatives_from_data(settings: dict):
    """The default: the row's own hard negatives from the data file (the first ``hard_negatives`` fields)."""
    if settings:
        raise ValueError(f"negative_selection 'from_data' takes no settings, got {sorted(settings)}.")

    def select(objective, rows: Sequence[int]) -> list[list[str]]:
        k = objective.config.hard_negatives
        return [objective.rows.negatives[r][:k] for r in rows]
    return select


class MinerSettings(StrictConfig):
    """Dynamic hard-negative mining (Conan-embedding-v2): when a negative is too easy and what replaces it."""

    label: ClassVar[str] = "mining settings"
    floor: float = 0.4
    ratio: float = Field(1.2, ge=1, description="S_t must fall below S0 / ratio")
    ceiling: float = 0.7
    pool_size: int = Field(16, ge=1, description="candidates kept per anchor (best scores)")
    false_negative_margin: float = 0.95
    from_batch: bool = True  # add in-batch texts to the pool


def too_easy(s0: float, st: float, *, floor: float = 0.4, ratio: float = 1.2, ceiling: float = 0.7) -> bool:
    """Conan-embedding-v2's rule: replace when the first score was already low, or the score has fallen by
    more than ``ratio`` and is no longer high."""
    return s0 < floor or (ratio * st < s0 and st < ceiling)


@dataclass
class _Slot:
    text: str
    s0: float | None = None  # score at first use (None until the loss has scored it)


@dataclass
class _Anchor:
    active: list[_Slot]
    pool: dict[str, float] = field(default_factory=dict)  # candidate text -> latest score
    used: set[str] = field(default_factory=set)  # texts that were active once (not re-activated)


class DynamicNegatives:
    """Per-anchor state: active negatives, candidate pool, replacement counts.

    ``select(rows)`` gives each row's active negatives; ``observe(rows, texts, anchors, positives, negatives)``
    updates them from the step's embeddings (local rows, in the order ``select`` returned them).
    """

    def __init__(self, data_negatives: Sequence[Sequence[str]], positives: Sequence[str], anchors: Sequence[str],
                 k: int, settings: MinerSettings | None = None):
        self.settings = settings or MinerSettings()
        self.k = k
        self.positives, self.anchors = list(positives), list(anchors)
        self.state: list[_Anchor] = []
        for negs in data_negatives:
            if len(negs) < k:
                raise ValueError(f"every row needs {k} negatives to start from; a row has {len(negs)}.")
            self.state.append(_Anchor(active=[_Slot(t) for t in negs[:k]], used=set(negs[:k])))
            for extra in negs[k:]:  # further data negatives wait in the pool, first in line
                self.state[-1].pool[extra] = float("inf")
        self.replacements = 0
        self.observed = 0

    def select(self, rows: Sequence[int]) -> list[list[str]]:
        return [[slot.text for slot in self.state[r].active] for r in rows]

    def _offer(self, row: int, text: str, score: float, positive_score: float) -> None:
        anchor = self.state[row]
        if text in anchor.used or text == self.positives[row] or text == self.anchors[row]:
            return
        if score >= self.settings.false_negative_margin * positive_score:
            return
        if text in anchor.pool and anchor.pool[text] == float("inf"):
            return  # data negatives keep their place
        anchor.pool[text] = score
        if len(anchor.pool) > self.settings.pool_size:
            del anchor.pool[min(anchor.pool, key=anchor.pool.get)]

    def _replace(self, row: int, slot: int) -> bool:
        anchor = self.state[row]
        if not anchor.pool:
            return False
        best = max(anchor.pool, key=anchor.pool.get)
        del anchor.pool[best]
        anchor.active[slot] = _Slot(best)
        anchor.used.add(best)
        self.replacements += 1
        return True

    @torch.no_grad()
    def observe(self, rows: Sequence[int], anchors: torch.Tensor, positives: torch.Tensor,
                negatives: torch.Tensor) -> int:
        """Update from one step: anchors, positives (n, H) and negatives (n * k, H) of these rows, negatives in
        ``select`` order. Returns the number of negatives replaced."""
        s = self.settings
        rows = list(rows)
        n = len(rows)
        a = F.normalize(anchors.detach().float(), dim=-1)
        p = F.normalize(positives.detach().float(), dim=-1)
        neg = F.normalize(negatives.detach().float(), dim=-1)
        positive_scores = (a * p).sum(-1).tolist()
        own = (a.unsqueeze(1) * neg.view(n, self.k, -1)).sum(-1).tolist()  # (n, k): the loss's hard-negative scores
        texts = [t for row in self.select(rows) for t in row]
        candidate_texts = [self.positives[r] for r in rows] + texts
        cross = (a @ torch.cat([p, neg]).T).tolist() if s.from_batch else None
        before = self.replacements
        for i, row in enumerate(rows):
            if cross is not None:
                for j, text in enumerate(candidate_texts):
                    self._offer(row, text, cross[i][j], positive_scores[i])
            for slot_index, slot in enumerate(self.state[row].active):
                score = own[i][slot_index]
                if slot.s0 is None:
                    slot.s0 = score
                if too_easy(slot.s0, score, floor=s.floor, ratio=s.ratio, ceiling=s.ceiling):
                    self._replace(row, slot_index)
        self.observed += n
        return self.replacements - before

    def stats(self) -> dict:
        return {"replacements": self.replacements, "observed": self.observed,
                "mean_pool": sum(len(a.pool) for a in self.state) / max(1, len(self.state))}

    def settings_dict(self) -> dict:
        return self.settings.to_dict()


class DynamicSelector:
    """The supervised objective's ``dynamic`` selector: active negatives per row, updated from the loss's
    embeddings (``observe``), gathered from every process in rank order so that all miners agree."""

    def __init__(self, settings: MinerSettings):
        self.settings = settings
        self.miner: DynamicNegatives | None = None

    def __call__(self, objective, rows: Sequence[int]) -> list[list[str]]:
        if self.miner is None:
            k = objective.config.hard_negatives
            if k < 1:
                raise ValueError("negative_selection 'dynamic' needs hard_negatives >= 1.")
            self.miner = DynamicNegatives(objective.rows.negatives, objective.rows.positives, objective.rows.anchors,
                                          k, self.settings)
        return self.miner.select(rows)

    def observe(self, rows: Sequence[int], anchors: torch.Tensor, positives: torch.Tensor,
                negatives: torch.Tensor) -> None:
        rows = distributed.all_gather(torch.tensor(list(rows), dtype=torch.long)).tolist()
        anchors, positives, negatives = (distributed.all_gather(t) for t in (anchors, positives, negatives))
        self.miner.observe(rows, anchors, positives, negatives)

    def stats(self) -> dict:
        return self.miner.stats() if self.miner is not None else {}


@register_negative_selector("dynamic")
def dynamic_negatives(settings: dict) -> DynamicSelector:
    return DynamicSelector(MinerSettings.from_dict(settings))
