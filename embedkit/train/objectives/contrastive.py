"""What the contrastive objectives (SimCSE, supervised) share: their config keys, dropout during training,
tokenization with the embedder's template, GradCache towers (with Matryoshka prefixes), and a trainable pooler.
Registers nothing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_serializer
from torch import nn

from embedkit.batching import Tokenized, tokenize
from embedkit.train.config import Fraction, PositiveFloat, PositiveInt, StageConfig
from embedkit.train.losses import EmbedFn, tower_loss
from embedkit.train.matryoshka import MatryoshkaSpec, matryoshka_loss, record_dims, width_problem
from embedkit.train.objectives.base import Objective


class ContrastiveConfig(StageConfig):
    temperature: PositiveFloat = 0.05
    mini_batch_size: PositiveInt | None = Field(
        None, description="GradCache chunk size: the batch's loss with the memory of this many rows.")
    gather_across_processes: bool = True
    attention_dropout: Fraction = 0.0
    hidden_dropout: Fraction = 0.0
    matryoshka: MatryoshkaSpec | None = Field(
        None, description="{dims, weights}: the loss summed over truncated, renormalised prefixes (matryoshka.py).")

    @model_serializer(mode="wrap")
    def _without_unset_matryoshka(self, handler):
        """Left out while None, so recipes saved before the key existed keep their fingerprint (and resume)."""
        data = handler(self)
        if isinstance(data, dict) and data.get("matryoshka", 0) is None:
            del data["matryoshka"]
        return data


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

    def _embed_fn(self, tokenized: Tokenized, rows: Sequence[int]):
        emb = self.ctx.embedder

        def embed(chunk: Sequence[int]) -> torch.Tensor:
            return emb(*emb.collate(tokenized, [rows[i] for i in chunk]))
        return embed

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
        """``tower_loss`` of ``loss_terms`` summed over the Matryoshka prefixes (if any), with GradCache chunks."""
        return tower_loss(towers, matryoshka_loss(self.loss_terms(loss_fn, rows), self.config.matryoshka),
                          self.config.mini_batch_size)

    def extra_parameters(self) -> list[nn.Parameter]:
        """A trainable pooler (NV-Embed latent attention) trains with the contrastive objectives."""
        pooler = self.ctx.embedder.pooler
        return [p.requires_grad_(True) for p in pooler.parameters()] if pooler is not None else []
