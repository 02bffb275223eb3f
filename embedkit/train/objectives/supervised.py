"""Supervised contrastive (LLM2Vec / E5 style): (anchor, positive[, hard negatives]) rows; each anchor against
its positive, the other rows' positives and all hard negatives of the (global) batch. Which hard negatives a
row uses is the registered ``negative_selection`` (``embedkit/train/negatives.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from embedkit.batching import Tokenized
from embedkit.train.config import NonNegativeInt, PositiveFloat
from embedkit.train.data import PairRows, read_pairs
from embedkit.train.losses import Loss, info_nce
from embedkit.train.negatives import NEGATIVE_SELECTORS
from embedkit.train.objectives.base import register_objective
from embedkit.train.objectives.contrastive import ContrastiveConfig, ContrastiveObjective


class SupervisedConfig(ContrastiveConfig):
    """(anchor, positive[, negatives]) rows; in-batch plus hard negatives."""

    objective: Literal["supervised"] = "supervised"
    temperature: PositiveFloat = 0.02
    hard_negatives: NonNegativeInt = 1
    negative_selection: str = "from_data"
    negative_settings: dict[str, Any] = {}
    instruction: str | None = None
    same_source_batches: bool = False


@register_objective("supervised", config=SupervisedConfig)
class Supervised(ContrastiveObjective):
    config: SupervisedConfig
    rows: PairRows

    @classmethod
    def check_data(cls, config, data_dir, recipe_dir) -> int:
        return sum(len(read_pairs(p, config.data, config.hard_negatives))
                   for p in cls.data_paths(config, data_dir, recipe_dir))

    def prepare(self) -> None:
        self.rows = PairRows()
        for path in self.data_paths(self.config, self.ctx.data_dir, self.ctx.recipe_dir):
            part = read_pairs(path, self.config.data, self.config.hard_negatives)
            for name in ("anchors", "positives", "negatives", "sources", "instructions"):
                getattr(self.rows, name).extend(getattr(part, name))
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

    def groups(self) -> list[str] | None:
        return self.rows.sources if self.config.same_source_batches else None

    def loss(self, rows: Sequence[int], step: int) -> Loss:
        rows = list(rows)
        cfg = self.config
        negatives = self.select_negatives(self, rows)
        if any(len(n) != cfg.hard_negatives for n in negatives):
            raise ValueError(f"negative selector {cfg.negative_selection!r} must give {cfg.hard_negatives} "
                             "negatives per row.")
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
            return info_nce(a, p, n, temperature=cfg.temperature, gather=cfg.gather_across_processes)
        value, finish = self.towers_loss(towers, loss_fn, rows)
        return Loss(value, float(len(rows)), tokens, finish)

    def report(self) -> dict:
        stats = getattr(self.select_negatives, "stats", None)
        return stats() if callable(stats) else {}
