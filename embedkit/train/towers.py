"""The towers of a contrastive batch (anchors, positives, hard negatives; SimCSE's two views) embedded together,
their texts sorted by length, so a step runs few padding tokens.

Each tower used to run as its own batch padded to its longest text: on SNLI triplets under the PromptEOL template
a third of the tokens a step ran through the model were padding, and a CPU step's time goes to matmuls over all of
them (docs/training.md, "CPU notes"). Here every tower's texts are pooled, sorted by length and cut into at most as
many batches as there were towers, where the fewest padding cells fall (``least_padding_split``), each padded to its
own longest text; the embeddings go back to tower order. Padding is masked, so the embeddings are the same up to float
rounding. Dropout would draw its masks in another order, so with dropout this is opt-in (the stage key
``sort_by_length``); GradCache (``mini_batch_size``) keeps one tower per pass.

Without dropout, where the model takes packed forwards (``packing.packing_blocker``), the pooled texts run as one
packed forward instead (the stage key ``packed``): rows of texts back to back, no padding but the rows' tails, and
in causal mode the prefix every text shares (a template's head) computed once per row.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
from torch import nn

from embedkit.batching import Tokenized
from embedkit.packing import packed_vectors, packing_blocker


class TowerRows:
    """A tower's embed function (row positions -> embeddings with gradients) that also says which texts it embeds,
    so towers can be run together."""

    def __init__(self, embedder, tokenized: Tokenized, rows: Sequence[int]):
        self.embedder, self.tokenized, self.rows = embedder, tokenized, list(rows)

    def __call__(self, chunk: Sequence[int]) -> torch.Tensor:
        emb = self.embedder
        return emb(*emb.collate(self.tokenized, [self.rows[i] for i in chunk]))

    def text(self, position: int) -> tuple[list[int], int]:
        """Token ids and instruction length of the tower's ``position``-th text."""
        row = self.rows[position]
        return self.tokenized.ids[row], self.tokenized.prefix_lengths[row]


def draws_dropout(model: nn.Module) -> bool:
    """Whether a training forward of ``model`` draws dropout masks: an ``nn.Dropout`` with p > 0 (LoRA's dropout
    too) or an attention module with ``attention_dropout`` > 0, in training mode."""
    for module in model.modules():
        if not module.training:
            continue
        if isinstance(module, nn.Dropout) and module.p > 0:
            return True
        rate = getattr(module, "attention_dropout", 0.0)
        if isinstance(rate, float) and rate > 0:
            return True
    return False


def sorted_forward(towers: Sequence[tuple[object, int]], packed: bool = False) -> list[torch.Tensor] | None:
    """Every tower's (n, H) embeddings from shared length-sorted batches, or one packed forward (``packed``, where
    the model takes it); None when a tower is not ``TowerRows`` over all its rows (then each runs on its own)."""
    if not towers or not all(isinstance(fn, TowerRows) and n == len(fn.rows) for fn, n in towers):
        return None
    texts = [fn.text(i) for fn, n in towers for i in range(n)]
    embedder = towers[0][0].embedder
    sizes = [n for _, n in towers]
    if packed and packing_blocker(embedder, max(len(ids) for ids, _ in texts)) is None:
        batch = Tokenized([ids for ids, _ in texts], [prefix for _, prefix in texts])
        return list(packed_vectors(embedder, batch, range(len(texts))).split(sizes))
    order = sorted(range(len(texts)), key=lambda k: len(texts[k][0]))  # stable: ties keep tower order
    parts = []
    for start, stop in least_padding_split([len(texts[k][0]) for k in order], len(towers)):
        chunk = [texts[k] for k in order[start:stop]]
        batch = Tokenized([ids for ids, _ in chunk], [prefix for _, prefix in chunk])
        parts.append(embedder(*embedder.collate(batch)))
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.as_tensor(order)] = torch.arange(len(order))
    merged = torch.cat(parts)[back.to(parts[0].device)]
    return list(merged.split(sizes))


def least_padding_split(lengths: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Cut ascending ``lengths`` into at most ``parts`` runs ``[start, stop)`` with the fewest padded cells (each run
    is padded to its last length). Cuts fall between distinct lengths: a dynamic programme over those."""
    values = sorted(set(lengths))
    ends = [bisect.bisect_right(lengths, v) for v in values]  # ends[j]: how many texts are <= values[j]
    # cost[j], cuts[j]: the fewest cells that cover the texts up to values[j] with the runs allowed so far, and where
    cost = [ends[j] * values[j] for j in range(len(values))]
    cuts: list[list[int]] = [[] for _ in values]
    for _ in range(parts - 1):
        new_cost, new_cuts = cost[:], cuts[:]
        for j in range(len(values)):
            for i in range(j):
                total = cost[i] + (ends[j] - ends[i]) * values[j]
                if total < new_cost[j]:
                    new_cost[j], new_cuts[j] = total, [*cuts[i], ends[i]]
        cost, cuts = new_cost, new_cuts
    bounds = [0, *cuts[-1], len(lengths)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))
