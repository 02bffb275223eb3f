"""Unsupervised SimCSE: a sentence and itself under two dropout masks are the positive pair; the other
sentences of the (global) batch are the negatives."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from embedkit.train.config import Fraction, PositiveFloat
from embedkit.train.losses import Loss, info_nce
from embedkit.train.objectives.base import register_objective
from embedkit.train.objectives.contrastive import ContrastiveConfig, ContrastiveObjective


class SimCSEConfig(ContrastiveConfig):
    """Unsupervised SimCSE: each sentence with itself, dropout as augmentation, in-batch negatives."""

    objective: Literal["simcse"] = "simcse"
    temperature: PositiveFloat = 0.05
    attention_dropout: Fraction = 0.1
    hidden_dropout: Fraction = 0.0


@register_objective("simcse", config=SimCSEConfig)
class SimCSE(ContrastiveObjective):
    config: SimCSEConfig

    @classmethod
    def check_data(cls, config, data_dir, recipe_dir) -> int:
        return cls.count_texts(config, data_dir, recipe_dir)

    def prepare(self) -> None:
        self.tokenized = self._tokenize(self.read_all_texts(self.config, self.ctx.data_dir, self.ctx.recipe_dir))

    def num_rows(self) -> int:
        return len(self.tokenized)

    def loss(self, rows: Sequence[int], step: int) -> Loss:
        rows = list(rows)
        embed = self._embed_fn(self.tokenized, rows)
        cfg = self.config
        value, finish = self.towers_loss(
            [(embed, len(rows)), (embed, len(rows))],
            lambda a, b: info_nce(a, b, None, temperature=cfg.temperature, gather=cfg.gather_across_processes),
            rows)
        return Loss(value, float(len(rows)), 2 * self._count(self.tokenized, rows), finish)
