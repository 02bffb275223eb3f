"""The parameter-free poolings: mean, weighted_mean, last, eos, first.

Definitions match sentence-transformers' ``Pooling`` (the mode each maps to), so saved models give the same
vectors there. Sums accumulate in float32 even for bf16 states.
"""

from __future__ import annotations

import torch

from embedkit.pooling.base import Pooler, register_pooler


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row (works for left and right padding); 0 for an all-zero row."""
    length = mask.shape[1]
    positions = torch.arange(length, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values.clamp(min=0)


def first_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first 1 in each row."""
    return mask.to(torch.int32).argmax(dim=1)


def weighted_average(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum of states times (B, L) weights over the sum of weights, in float32, back in the states' dtype."""
    summed = (hidden.to(torch.float32) * weights.unsqueeze(-1)).sum(dim=1)
    return (summed / weights.sum(dim=1, keepdim=True).clamp(min=1e-9)).to(hidden.dtype)


@register_pooler
class MeanPooler(Pooler):
    """Mean of the pooled tokens."""

    name = "mean"
    st_pooling_mode = "mean"

    def pool(self, hidden, attention_mask, pool_mask):
        return weighted_average(hidden, pool_mask.to(torch.float32))


@register_pooler
class WeightedMeanPooler(Pooler):
    """Position-weighted mean (SGPT): a token's weight is its position among real tokens, from 1 (instruction
    tokens count, as in SGPT / sentence-transformers)."""

    name = "weighted_mean"
    st_pooling_mode = "weightedmean"

    def pool(self, hidden, attention_mask, pool_mask):
        weights = pool_mask.to(torch.float32) * attention_mask.to(torch.float32).cumsum(dim=1)
        return weighted_average(hidden, weights)


@register_pooler
class LastTokenPooler(Pooler):
    """The last real token's state: under causal attention the only one that has read the whole text."""

    name = "last"
    st_pooling_mode = "lasttoken"

    def pool(self, hidden, attention_mask, pool_mask):
        batch = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[batch, last_index(pool_mask)]


@register_pooler
class EOSPooler(LastTokenPooler):
    """The state of an EOS token appended to every text (E5-Mistral, Qwen3-Embedding style)."""

    name = "eos"
    appends_eos = True


@register_pooler
class FirstTokenPooler(Pooler):
    """The first pooled token's state (CLS style; useful under bidirectional attention)."""

    name = "first"
    st_pooling_mode = "cls"

    def pool(self, hidden, attention_mask, pool_mask):
        batch = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[batch, first_index(pool_mask)]
