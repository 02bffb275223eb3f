"""CoSENT (Su 2022; sentence-transformers' ``CoSENTLoss``) for scored pairs such as STS rows
``{"sentence1", "sentence2", "score"}``: every two pairs of the (global) batch whose gold scores differ are
ranked, ``log(1 + sum over score_i < score_j of exp(scale * (sim_i - sim_j)))``; only the order of the
scores matters. ``scale`` is ``1 / temperature`` (0.05: sentence-transformers' scale 20). ``angle.py``
swaps the similarity for AnglE's."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from embedkit import distributed
from embedkit.train.config import PositiveFloat
from embedkit.train.data import DataError, _field, _is_jsonl, _jsonl_rows
from embedkit.train.losses import Loss
from embedkit.train.objectives.base import register_objective
from embedkit.train.objectives.contrastive import ContrastiveConfig, ContrastiveObjective


class CoSENTConfig(ContrastiveConfig):
    """Scored pairs: jsonl rows with two texts and a number (only its order within a batch matters)."""

    objective: Literal["cosent"] = "cosent"
    temperature: PositiveFloat = 0.05
    sentence1_field: str = "sentence1"
    sentence2_field: str = "sentence2"
    score_field: str = "score"


def cosent_loss(similarities: torch.Tensor, scores: torch.Tensor, scale: float) -> torch.Tensor:
    """``log(1 + sum_{scores_i < scores_j} exp(scale * (sim_i - sim_j)))`` over the pairs of a batch."""
    sims = similarities.float() * scale
    diff = sims[:, None] - sims[None, :]
    ranked = diff[scores[:, None] < scores[None, :]]
    return torch.logsumexp(torch.cat([sims.new_zeros(1), ranked]), dim=0)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def read_scored_pairs(path: Path, config: CoSENTConfig) -> tuple[list[str], list[str], list[float]]:
    """The stage's jsonl file as (first texts, second texts, scores); errors name the file and line."""
    if not _is_jsonl(path, config.data.format):
        raise DataError(f"{path}: {config.objective} data must be jsonl rows with {config.sentence1_field!r}, "
                        f"{config.sentence2_field!r} and {config.score_field!r} fields.")
    first, second, scores = [], [], []
    for number, row in _jsonl_rows(path):
        first.append(_field(path, number, row, config.sentence1_field))
        second.append(_field(path, number, row, config.sentence2_field))
        score = row.get(config.score_field)
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not np.isfinite(score):
            raise DataError(f"{path}:{number}: field {config.score_field!r} must be a number, got {score!r}; fix "
                            "the row or set the stage's score_field.")
        scores.append(float(score))
        if config.data.limit and len(scores) >= config.data.limit:
            break
    if not scores:
        raise DataError(f"{path} has no rows (empty file).")
    return first, second, scores


@register_objective("cosent", config=CoSENTConfig)
class CoSENT(ContrastiveObjective):
    """The loss of the global batch on every process (count 1 each): the trainer's share-of-the-batch scaling
    and the gathered similarities' gradients add up to the one-process gradient."""

    config: CoSENTConfig
    similarity = staticmethod(cosine_similarity)

    @classmethod
    def check_data(cls, config, data_dir, recipe_dir) -> int:
        return sum(len(read_scored_pairs(p, config)[2]) for p in cls.data_paths(config, data_dir, recipe_dir))

    def prepare(self) -> None:
        first, second, scores = [], [], []
        for path in self.data_paths(self.config, self.ctx.data_dir, self.ctx.recipe_dir):
            a, b, s = read_scored_pairs(path, self.config)
            first, second, scores = first + a, second + b, scores + s
        self.first, self.second = self._tokenize(first), self._tokenize(second)
        self.scores = torch.tensor(scores, dtype=torch.float32)

    def num_rows(self) -> int:
        return len(self.scores)

    def loss(self, rows: Sequence[int], step: int) -> Loss:
        rows = list(rows)
        cfg = self.config
        gold = self.scores[rows].to(self.ctx.embedder.device)
        gather = cfg.gather_across_processes and distributed.world_size() > 1

        def loss_fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            sims = self.similarity(a, b)
            if gather:
                sims, scores = distributed.gather_with_grad(sims), distributed.all_gather(gold)
                return cosent_loss(sims, scores, 1 / cfg.temperature)
            return cosent_loss(sims, gold, 1 / cfg.temperature)
        towers = [(self._embed_fn(self.first, rows), len(rows)), (self._embed_fn(self.second, rows), len(rows))]
        value, finish = self.towers_loss(towers, loss_fn, rows)
        tokens = self._count(self.first, rows) + self._count(self.second, rows)
        return Loss(value, 1.0, tokens, finish)
