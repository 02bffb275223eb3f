"""What the contrastive objectives (SimCSE, supervised) share: their config keys, dropout during training,
tokenization with the embedder's template, GradCache towers (with Matryoshka prefixes), a trainable pooler,
how batches are drawn from the stage's sources, and which in-batch candidates are false negatives.
Registers nothing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from embedkit.batching import Tokenized, tokenize
from embedkit.train.config import Fraction, PositiveFloat, PositiveInt, SourceList, StageConfig, Strict, added_later
from embedkit.train.data import DataError, RowGroups
from embedkit.train.losses import EmbedFn, FalseNegatives, text_keys, tower_loss
from embedkit.train.matryoshka import MatryoshkaSpec, matryoshka_loss, record_dims, width_problem
from embedkit.train.objectives.base import Objective
from embedkit.train.sources import source_weights
from embedkit.train.towers import TowerRows, draws_dropout, sorted_forward


class FalseNegativeSpec(Strict):
    """In-batch candidates left out of an anchor's negatives (see ``losses.FalseNegatives``)."""

    duplicates: bool = Field(True, description="The anchor's positive text again, or another row's positive "
                                               "with the same anchor text.")
    margin: float | None = Field(None, ge=-2, le=2, description="Also drop candidates whose cosine exceeds the "
                                                                "positive's by more than this (GISTEmbed's guard).")


class ContrastiveConfig(StageConfig):
    temperature: PositiveFloat = 0.05
    mini_batch_size: PositiveInt | None = Field(
        None, description="GradCache chunk size: the batch's loss with the memory of this many rows.")
    gather_across_processes: bool = True
    attention_dropout: Fraction = 0.0
    hidden_dropout: Fraction = 0.0
    matryoshka: MatryoshkaSpec | None = added_later(
        None, description="{dims, weights}: the loss summed over truncated, renormalised prefixes (matryoshka.py).")
    batches: Literal["auto", "same_source", "mixed"] = added_later(
        "auto", description="same_source: each batch from one source (sources drawn by weight); mixed: rows of all "
                            "sources in a batch. auto: same_source for a list of sources, else as before.")
    false_negatives: FalseNegativeSpec = added_later(FalseNegativeSpec())
    sort_by_length: Literal["auto", "always", "off"] = added_later(
        "auto", description="Run the towers (anchors, positives, negatives; SimCSE's two views) together, sorted by "
        "length, for less padding (towers.py). auto: when the forward draws no dropout (then the numbers are those of "
        "one pass per tower, up to rounding); always: with dropout too (its masks come in another order); off.")
    packed: bool = added_later(
        True, description="Run the towers' texts as one packed forward (no padding; a causal model computes the prefix "
        "all texts share once per row) when they run together without dropout and the model takes packed forwards.")

    def batch_kind(self) -> str:
        if self.batches != "auto":
            return self.batches
        if isinstance(self.data, SourceList):
            return "same_source"
        return "same_source" if getattr(self, "same_source_batches", False) else "mixed"


@contextlib.contextmanager
def dropout_settings(model: nn.Module, attention: float, hidden: float) -> Iterator[None]:
    """Attention-probability dropout (the attention modules' ``attention_dropout``) and hidden dropout on
    each attention and MLP sublayer output (BERT's placement; Llama-style models have none of their own)."""
    saved = []
    for module in model.modules():
        value = getattr(module, "attention_dropout", None)
        if isinstance(value, float) and not isinstance(module, nn.Dropout):
            saved.append((module, value))
            module.attention_dropout = attention
    handles = []
    if hidden > 0:
        def hook(module, args, output):
            if not module.training:
                return output
            if isinstance(output, tuple):
                return (F.dropout(output[0], hidden, True),) + tuple(output[1:])
            return F.dropout(output, hidden, True)

        for name, module in model.named_modules():
            if name.endswith((".mlp", ".self_attn")):
                handles.append(module.register_forward_hook(hook))
        if not handles:
            raise ValueError("hidden_dropout: found no '.mlp' / '.self_attn' sublayers in this model to drop out "
                             "from; set hidden_dropout: 0.")
    try:
        yield
    finally:
        for module, value in saved:
            module.attention_dropout = value
        for handle in handles:
            handle.remove()


class ContrastiveObjective(Objective):
    """Base of SimCSE and supervised: the loss is InfoNCE summed over this process's anchors."""

    config: ContrastiveConfig

    def _tokenize(self, texts: Sequence[str], instruction: str | None = None) -> Tokenized:
        emb = self.ctx.embedder
        return tokenize(self.ctx.tokenizer, texts, max_length=self.ctx.max_length, instruction=instruction,
                        template=emb.config.template, append_eos=emb.config.pooling == "eos")

    def _embed_fn(self, tokenized: Tokenized, rows: Sequence[int]) -> TowerRows:
        return TowerRows(self.ctx.embedder, tokenized, rows)

    def _row_groups(self, sources: list[str]) -> RowGroups | list[str] | None:
        """How batches are drawn: the original ``data: {paths}`` form as before (``same_source_batches`` groups by
        file or ``source_field``); a list of sources by their weights, every source holding a whole batch."""
        same = self.config.batch_kind() == "same_source"
        data = self.config.data
        if not isinstance(data, SourceList):
            return sources if same else None
        if same:
            for spec in data.sources:
                n = sources.count(spec.label)
                if n < self.config.batch_size:
                    raise DataError(f"source {spec.label!r} has {n} rows, fewer than batch_size="
                                    f"{self.config.batch_size}: same-source batches take a whole batch from one "
                                    "source; lower batch_size, leave the source out, or set batches: mixed.")
        return RowGroups(sources, source_weights(data, sources), same)

    def _set_keys(self, anchors: Sequence[str], positives: Sequence[str]) -> None:
        """Text keys of every row, for the duplicate rule (computed once)."""
        self.anchor_keys, self.positive_keys = text_keys(anchors), text_keys(positives)
        self.false_negative_counts: dict[str, int] = {}

    def _false_negatives(self, rows: Sequence[int], negatives: Sequence[str] | None = None) -> FalseNegatives | None:
        """The rule for this step's rows; ``negatives``: the hard negatives' texts (None when the stage has none;
        possibly empty on one process and not on another, as the loss's negatives)."""
        spec = self.config.false_negatives
        if not spec.duplicates and spec.margin is None:
            return None
        index = torch.as_tensor(list(rows), dtype=torch.long)
        return FalseNegatives(self.anchor_keys[index], self.positive_keys[index],
                              None if negatives is None else text_keys(negatives), spec.duplicates, spec.margin,
                              self.false_negative_counts)

    def report(self) -> dict:
        """Candidates left out as false negatives over the stage, per rule (only rules that left some out)."""
        counts = getattr(self, "false_negative_counts", None) or {}
        return {f"false_negatives_{k}": v for k, v in counts.items() if v}

    @staticmethod
    def _count(tokenized: Tokenized, rows: Sequence[int]) -> int:
        return sum(len(tokenized.ids[r]) for r in rows)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with dropout_settings(self.ctx.embedder.backbone, self.config.attention_dropout, self.config.hidden_dropout):
            yield

    @classmethod
    def check_model(cls, config: ContrastiveConfig, embedder) -> str | None:
        return width_problem(config.matryoshka, embedder.dimension)

    def setup_model(self) -> None:
        record_dims(self.ctx.embedder, self.config.matryoshka)

    def loss_terms(self, loss_fn, rows: Sequence[int]):
        """The loss on the towers' embeddings; subclasses add terms (distillation adds its KL)."""
        return loss_fn

    def towers_loss(self, towers: Sequence[tuple[EmbedFn, int]], loss_fn, rows: Sequence[int]):
        """``tower_loss`` of ``loss_terms`` summed over the Matryoshka prefixes (if any), with GradCache chunks;
        without GradCache the towers may run together, sorted by length (``sort_by_length``, ``towers.py``)."""
        cfg = self.config
        together = cfg.mini_batch_size is None and cfg.sort_by_length != "off" and all(
            isinstance(fn, TowerRows) for fn, _ in towers)
        # hidden dropout is a hook, not a module: asked separately
        dropout = together and (cfg.hidden_dropout > 0 or draws_dropout(towers[0][0].embedder.backbone))
        if cfg.sort_by_length == "auto":
            together = together and not dropout
        shared = sorted_forward(towers, packed=cfg.packed and not dropout) if together else None
        if shared is not None:
            towers = [(lambda chunk, e=e: e[chunk.start:chunk.stop], n) for e, (_, n) in zip(shared, towers,
                                                                                            strict=True)]
        return tower_loss(towers, matryoshka_loss(self.loss_terms(loss_fn, rows), self.config.matryoshka),
                          self.config.mini_batch_size)

    def extra_parameters(self) -> list[nn.Parameter]:
        """A trainable pooler (NV-Embed latent attention) trains with the contrastive objectives."""
        pooler = self.ctx.embedder.pooler
        return [p.requires_grad_(True) for p in pooler.parameters()] if pooler is not None else []
