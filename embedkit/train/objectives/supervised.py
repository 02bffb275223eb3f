"""Supervised contrastive (LLM2Vec / E5 style): (anchor, positive[, hard negatives]) rows; each anchor against
its positive, the other rows' positives and all hard negatives of the (global) batch (``symmetric``: also each
positive against the anchors). Which hard negatives a row uses is the registered ``negative_selection``
(``embedkit/train/negatives.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import model_validator

from embedkit.batching import Tokenized
from embedkit.train.config import NonNegativeInt, PositiveFloat, added_later
from embedkit.train.data import PairRows
from embedkit.train.losses import FalseNegatives, Loss, info_nce
from embedkit.train.negatives import NEGATIVE_SELECTORS
from embedkit.train.objectives.base import register_objective
from embedkit.train.objectives.contrastive import ContrastiveConfig, ContrastiveObjective
from embedkit.train.sources import read_stage_pairs


class SupervisedConfig(ContrastiveConfig):
    """(anchor, positive[, negatives]) rows; in-batch plus hard negatives. Pair rows (a source without negatives)
    and triplets mix: a pair's anchor has in-batch negatives only."""

    objective: Literal["supervised"] = "supervised"
    temperature: PositiveFloat = 0.02
    hard_negatives: NonNegativeInt = 1
    negative_selection: str = "from_data"
    negative_settings: dict[str, Any] = {}
    instruction: str | None = None
    symmetric: bool = added_later(
        False, description="Also each positive against the batch's anchors (sentence-transformers' "
                           "MultipleNegativesSymmetricRankingLoss): the loss is the mean of the two directions.")
    same_source_batches: bool = False  # the original form's same-source switch (``batches`` says it for both)

    @model_validator(mode="after")
    def _one_batch_kind(self) -> SupervisedConfig:
        if self.same_source_batches and self.batches == "mixed":
            raise ValueError("same_source_batches: true contradicts batches: mixed; give one of them")
        return self


@register_objective("supervised", config=SupervisedConfig)
class Supervised(ContrastiveObjective):
    config: SupervisedConfig
    rows: PairRows

    @classmethod
    def check_data(cls, config, data_dir, recipe_dir) -> int:
        return len(read_stage_pairs(config.data, config.hard_negatives, data_dir, recipe_dir))

    def prepare(self) -> None:
        self.rows = read_stage_pairs(self.config.data, self.config.hard_negatives, self.ctx.data_dir,
                                     self.ctx.recipe_dir)
        self._set_keys(self.rows.anchors, self.rows.positives)
        self.select_negatives = NEGATIVE_SELECTORS[self.config.negative_selection](self.config.negative_settings)
        self.anchors = self._tokenize_anchors()
        self.positives = self._tokenize(self.rows.positives)

    def _tokenize_anchors(self) -> Tokenized:
        """Anchors carry the stage instruction, or the row's own; instruction tokens are attended, not pooled."""
        out = Tokenized([[] for _ in range(len(self.rows))], [0] * len(self.rows))
        by_instruction: dict[str | None, list[int]] = {}
        for i, own in enumerate(self.rows.instructions):
            by_instruction.setdefault(own if own is not None else self.config.instruction, []).append(i)
        for instruction, idx in by_instruction.items():
            part = self._tokenize([self.rows.anchors[i] for i in idx], instruction)
            for j, i in enumerate(idx):
                out.ids[i], out.prefix_lengths[i] = part.ids[j], part.prefix_lengths[j]
            out.n_truncated += part.n_truncated
        return out

    def num_rows(self) -> int:
        return len(self.rows)

    def groups(self):
        return self._row_groups(self.rows.sources)

    def loss(self, rows: Sequence[int], step: int) -> Loss:
        rows = list(rows)
        cfg = self.config
        negatives = self.select_negatives(self, rows)
        if any(len(n) != min(cfg.hard_negatives, len(self.rows.negatives[r])) for r, n in zip(rows, negatives,
                                                                                             strict=True)):
            raise ValueError(f"negative selector {cfg.negative_selection!r} must give {cfg.hard_negatives} "
                             "negatives per row (a pair row: none).")
        towers = [(self._embed_fn(self.anchors, rows), len(rows)), (self._embed_fn(self.positives, rows), len(rows))]
        tokens = self._count(self.anchors, rows) + self._count(self.positives, rows)
        flat = [text for row in negatives for text in row]
        if flat:
            neg_tok = self._tokenize(flat)
            towers.append((self._embed_fn(neg_tok, list(range(len(flat)))), len(flat)))
            tokens += self._count(neg_tok, range(len(flat)))

        def loss_fn(a, p, n=None):
            observe = getattr(self.select_negatives, "observe", None)  # e.g. dynamic mining reads the scores
            if observe is not None and n is not None:
                observe(rows, a.detach(), p.detach(), n.detach())
            if n is None and cfg.hard_negatives:  # only pairs here: other processes may still hold negatives
                n = a.new_zeros((0, a.shape[1]))
            return self.info_nce(a, p, n, self._false_negatives(rows, flat if cfg.hard_negatives else None))
        value, finish = self.towers_loss(towers, loss_fn, rows)
        return Loss(value, float(len(rows)), tokens, finish)

    def info_nce(self, anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None,
                 rule: FalseNegatives | None) -> torch.Tensor:
        """InfoNCE summed over the anchors; ``symmetric``: the mean of it and the positives' InfoNCE over the
        anchors (sum over positives), with the false-negative rule reversed."""
        cfg = self.config
        value = info_nce(anchors, positives, negatives, temperature=cfg.temperature,
                         gather=cfg.gather_across_processes, false_negatives=rule)
        if not cfg.symmetric:
            return value
        back = info_nce(positives, anchors, temperature=cfg.temperature, gather=cfg.gather_across_processes,
                        false_negatives=rule.reversed() if rule is not None else None)
        return (value + back) / 2

    def report(self) -> dict:
        stats = getattr(self.select_negatives, "stats", None)
        return {**(stats() if callable(stats) else {}), **super().report()}
