"""Distillation from a teacher embedder: each anchor's similarity distribution over the batch's positives, as
the student sees it, is pulled towards the teacher's (KL with a temperature each, as sentence-transformers'
``DistillKLDivLoss``), plus the supervised InfoNCE by weight. ``distill_relations`` adds the other in-batch
distributions the teacher knows (positives over anchors, anchors over the other anchors, positives over the other
positives): relational distillation, the teacher's whole similarity matrix rather than one block of it. The data,
batches, negatives and Matryoshka block are the supervised objective's; teacher vectors come from
``embedkit/train/teacher.py`` (computed once per distinct text of the rows the stage's steps use, cached in the
run folder)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from embedkit import distributed
from embedkit.train.config import PositiveFloat, PositiveInt, added_later
from embedkit.train.data import DataError
from embedkit.train.objectives.base import register_objective
from embedkit.train.objectives.supervised import Supervised, SupervisedConfig
from embedkit.train.teacher import Teacher, teacher_problem

Relation = Literal["anchor_positive", "positive_anchor", "anchor_anchor", "positive_positive"]


class DistillConfig(SupervisedConfig):
    """Supervised rows; the loss is ``distill_weight * KL + contrastive_weight * InfoNCE``."""

    objective: Literal["distill"] = "distill"
    teacher: str = Field(description="A sentence-transformers or embedkit model folder, any backbone spec, or "
                                     "all-MiniLM-L6-v2.")
    distill_weight: PositiveFloat = 1.0
    contrastive_weight: Annotated[float, Field(ge=0)] = Field(1.0, description="0: distillation only.")
    student_temperature: PositiveFloat = 0.05
    teacher_temperature: PositiveFloat = 0.05
    teacher_max_length: PositiveInt | None = Field(None, description="The teacher's token limit (its own: None).")
    teacher_batch_size: PositiveInt = 64
    distill_relations: list[Relation] = added_later(
        ["anchor_positive"], min_length=1,
        description="Which in-batch distributions are distilled, as rows_candidates; a tower against itself leaves "
                    "each text's own column out. Each adds its KL to the distillation term.")


def distill_kl(anchors: torch.Tensor, positives: torch.Tensor, teacher_anchors: torch.Tensor,
               teacher_positives: torch.Tensor, *, student_temperature: float, teacher_temperature: float,
               gather: bool = True, exclude_self: bool = False) -> torch.Tensor:
    """KL(teacher || student) of each local anchor's softmax over the (global, with ``gather``) positives of
    cosine / temperature, summed over local anchors. ``exclude_self``: the candidates are the rows' own tower,
    so each row's own column (its cosine with itself) is left out of both softmaxes.

    Unlike ``DistillKLDivLoss`` there is no ``temperature**2`` factor: the KL's gradient per cosine is already
    ``(p_student - p_teacher) / student_temperature``, the order of InfoNCE's, so ``distill_weight`` compares
    the two terms directly.
    """
    offset = 0
    if gather and distributed.world_size() > 1:
        positives = distributed.gather_with_grad(positives)
        teacher_positives = distributed.all_gather(teacher_positives)
        offset = distributed.rank() * len(anchors)
    student = F.normalize(anchors.float(), dim=-1) @ F.normalize(positives.float(), dim=-1).T
    teacher = F.normalize(teacher_anchors.float(), dim=-1) @ F.normalize(teacher_positives.float(), dim=-1).T
    if exclude_self:
        rows, cols = student.shape
        others = torch.ones(rows, cols, dtype=torch.bool, device=student.device)
        others[torch.arange(rows), torch.arange(rows) + offset] = False
        student, teacher = student[others].view(rows, cols - 1), teacher[others].view(rows, cols - 1)
    log_student = torch.log_softmax(student / student_temperature, dim=-1)
    log_teacher = torch.log_softmax(teacher / teacher_temperature, dim=-1)
    return (log_teacher.exp() * (log_teacher - log_student)).sum()


@register_objective("distill", config=DistillConfig)
class Distill(Supervised):
    config: DistillConfig

    @classmethod
    def check_data(cls, config, data_dir, recipe_dir) -> int:
        problem = teacher_problem(config.teacher)
        if problem:
            raise DataError(problem)
        return super().check_data(config, data_dir, recipe_dir)

    def prepare_steps(self, rows: Sequence[int]) -> None:
        """Teacher vectors for the texts of the rows the steps use (anchors and positives; hard negatives are
        scored by the student only), in data order so that the cache key is the same on resume."""
        cfg = self.config
        index: dict[str, int] = {}
        for row in rows:
            index.setdefault(self.rows.anchors[row], len(index))
        for row in rows:
            index.setdefault(self.rows.positives[row], len(index))
        self.anchor_ids = np.full(len(self.rows), -1, dtype=np.int64)
        self.positive_ids = np.full(len(self.rows), -1, dtype=np.int64)
        used = np.asarray(rows, dtype=np.int64)
        self.anchor_ids[used] = [index[self.rows.anchors[r]] for r in rows]
        self.positive_ids[used] = [index[self.rows.positives[r]] for r in rows]
        self.teacher = Teacher(cfg.teacher, cfg.teacher_max_length, cfg.teacher_batch_size)
        self.teacher_vectors = torch.from_numpy(self.teacher.vectors(list(index), self.ctx.run_dir))
        self.teacher.close()  # the vectors are all the steps need: free the teacher's memory for training

    def loss_terms(self, loss_fn, rows: Sequence[int]):
        cfg, device = self.config, self.ctx.embedder.device
        picked = np.asarray(rows, dtype=np.int64)
        if (self.anchor_ids[picked] < 0).any():
            raise RuntimeError("distill: a step asked for rows outside the plan given to prepare_steps.")
        teacher_a = self.teacher_vectors[self.anchor_ids[picked]].to(device)
        teacher_p = self.teacher_vectors[self.positive_ids[picked]].to(device)

        def terms(anchors, positives, negatives=None):
            towers = {"anchor": (anchors, teacher_a), "positive": (positives, teacher_p)}
            kl = 0.0
            for relation in dict.fromkeys(cfg.distill_relations):
                row_name, candidate_name = relation.split("_")
                (rows, teacher_rows), (candidates, teacher_candidates) = towers[row_name], towers[candidate_name]
                kl = kl + distill_kl(
                    rows, candidates, teacher_rows, teacher_candidates, student_temperature=cfg.student_temperature,
                    teacher_temperature=cfg.teacher_temperature, gather=cfg.gather_across_processes,
                    exclude_self=row_name == candidate_name)
            total = cfg.distill_weight * kl
            if cfg.contrastive_weight > 0:
                total = total + cfg.contrastive_weight * loss_fn(anchors, positives, negatives)
            return total
        return terms

    def report(self) -> dict:
        return {**super().report(), "teacher_texts": int(self.teacher_vectors.shape[0]),
                "teacher_encoded": self.teacher.encoded}
