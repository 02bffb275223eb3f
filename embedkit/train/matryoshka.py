"""Matryoshka representation learning (Kusupati et al. 2022): the loss summed over truncated, renormalised
prefixes of the embeddings, so the first ``d`` components of a vector are an embedding on their own.

One place for every objective that uses it: a stage's ``matryoshka: {dims, weights}`` block wraps the
objective's loss on its towers' embeddings (``matryoshka_loss``), whatever that loss is (InfoNCE,
distillation's KL, CoSENT). As in sentence-transformers' ``MatryoshkaLoss``, only the listed dims are
trained: list the model's full width too to keep training the whole vector.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from embedkit.train.config import PositiveFloat, PositiveInt, Strict


class MatryoshkaSpec(Strict):
    """``dims``: the prefix widths trained; ``weights``: one positive weight per dim (default all 1)."""

    dims: Annotated[list[PositiveInt], Field(min_length=1)]
    weights: list[PositiveFloat] | None = None

    @model_validator(mode="after")
    def _check(self) -> MatryoshkaSpec:
        if len(set(self.dims)) != len(self.dims):
            raise ValueError(f"dims {self.dims} repeat a width; list each width once")
        if self.weights is not None and len(self.weights) != len(self.dims):
            raise ValueError(f"weights has {len(self.weights)} values for {len(self.dims)} dims; give one per dim "
                             "(or none for all 1)")
        return self

    def pairs(self) -> list[tuple[int, float]]:
        """(dim, weight), widest first."""
        weights = self.weights or [1.0] * len(self.dims)
        return sorted(zip(self.dims, weights, strict=True), reverse=True)


def truncate(embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    """The first ``dim`` components of each row, renormalised to unit length (what ``encode(dimensions=)``
    returns at inference)."""
    return F.normalize(embeddings[..., :dim].float(), dim=-1)


def matryoshka_loss(loss_fn: Callable[..., torch.Tensor], spec: MatryoshkaSpec | None) -> Callable[..., torch.Tensor]:
    """``loss_fn(*embeddings)`` as ``sum_d w_d * loss_fn(*(truncate(e, d) for e in embeddings))``; ``loss_fn``
    itself when ``spec`` is None. None arguments (a tower that is absent) pass through."""
    if spec is None:
        return loss_fn
    pairs = spec.pairs()

    def summed(*embeddings: torch.Tensor | None) -> torch.Tensor:
        total = None
        for dim, weight in pairs:
            cut = [None if e is None else truncate(e, dim) for e in embeddings]
            term = weight * loss_fn(*cut)
            total = term if total is None else total + term
        return total
    return summed


def width_problem(spec: MatryoshkaSpec | None, width: int) -> str | None:
    """A one-line message when a dim exceeds the model's ``width``, else None."""
    if spec is None:
        return None
    too_wide = [d for d in spec.dims if d > width]
    if not too_wide:
        return None
    return (f"matryoshka.dims {spec.dims}: {too_wide} larger than the model's width ({width}); use dims up to "
            f"{width}.")


def record_dims(embedder, spec: MatryoshkaSpec | None) -> None:
    """Save the trained dims in the embedder's config (``matryoshka_dims``), so ``encode(dimensions=)`` can warn on
    widths it was not trained for. The latest Matryoshka stage's dims win."""
    if spec is not None:
        embedder.config.matryoshka_dims = sorted(spec.dims)
