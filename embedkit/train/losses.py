"""The losses objectives return: one InfoNCE (temperature or learnable scale, negatives gathered across
processes with gradients) and GradCache towers.

Scaling convention: an objective returns a ``Loss`` whose ``value`` is a sum over this process's share of the
batch and whose ``count`` says how many units it sums (anchors, masked tokens; 1 for a local mean). The
trainer divides by the sum of ``count`` over processes, calls backward once, and sums gradients over
processes: one process with batch B and W processes with B/W each give the same loss and gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from embedkit import distributed


@dataclass
class Loss:
    """An objective's loss on this process's rows, before the trainer's scaling and backward."""

    value: torch.Tensor  # sum over this process's ``count`` units
    count: float  # units summed here; the trainer divides by their sum over processes
    tokens: int  # real (non-padding) tokens this process ran through the model
    finish: Callable[[], None] | None = None  # after backward (GradCache's second pass)


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None, *,
             temperature: float | None = None, scale: torch.Tensor | None = None, gather: bool = True
             ) -> torch.Tensor:
    """InfoNCE summed over this process's anchors: each anchor against every positive and hard negative of the
    (global, with ``gather``) batch, cosine similarity / ``temperature`` (or times a learnable ``scale``: GEM),
    cross-entropy with the anchor's own positive as the target.

    anchors, positives: (n, H) local rows; negatives: (n * k, H) or None.
    """
    if (temperature is None) == (scale is None):
        raise ValueError("info_nce takes a temperature or a scale, not both.")
    rank, size = (distributed.rank(), distributed.world_size()) if gather else (0, 1)
    candidates = [distributed.gather_with_grad(positives) if size > 1 else positives]
    if negatives is not None and negatives.shape[0]:
        candidates.append(distributed.gather_with_grad(negatives) if size > 1 else negatives)
    docs = F.normalize(torch.cat(candidates).float(), dim=-1)
    queries = F.normalize(anchors.float(), dim=-1)
    scores = queries @ docs.T / temperature if scale is None else scale * (queries @ docs.T)
    n = anchors.shape[0]
    labels = torch.arange(rank * n, rank * n + n, device=scores.device)
    return F.cross_entropy(scores, labels, reduction="sum")


def contrastive_loss(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None,
                     temperature: float, gather: bool = True) -> torch.Tensor:
    """``info_nce`` as this process's share of the global mean (sum over local anchors / global n): the
    processes' values add up to the one-process loss."""
    size = distributed.world_size() if gather else 1
    return info_nce(anchors, positives, negatives, temperature=temperature, gather=gather) / (anchors.shape[0] * size)


EmbedFn = Callable[[Sequence[int]], torch.Tensor]  # row positions within a tower -> (len, H) embeddings


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _chunks(n: int, size: int | None) -> list[range]:
    size = size or n
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def tower_loss(towers: Sequence[tuple[EmbedFn, int]], loss_fn: Callable[..., torch.Tensor],
               mini_batch_size: int | None = None) -> tuple[torch.Tensor, Callable[[], None] | None]:
    """``loss_fn(*embeddings)`` of each tower (``(embed_fn, n_rows)``), and what to run after its backward.

    With ``mini_batch_size`` this is GradCache (Gao et al. 2021): embed every chunk without a graph (saving
    its RNG state so dropout repeats); the loss is taken on those embeddings as leaves; after the caller's
    backward has filled their gradients, ``finish`` re-embeds each chunk with a graph and backpropagates the
    cached gradient. Same loss and gradients as the whole batch, with the activation memory of a chunk.
    """
    if mini_batch_size is None:
        return loss_fn(*[embed(range(n)) for embed, n in towers]), None
    states: list[list[tuple]] = []
    leaves = []
    with torch.no_grad():
        for embed, n in towers:
            parts, tower_states = [], []
            for chunk in _chunks(n, mini_batch_size):
                tower_states.append(_rng_state())
                parts.append(embed(chunk))
            states.append(tower_states)
            leaves.append(torch.cat(parts).detach().requires_grad_(True))

    def finish() -> None:
        after = _rng_state()
        for (embed, n), tower_states, leaf in zip(towers, states, leaves, strict=True):
            for chunk, state in zip(_chunks(n, mini_batch_size), tower_states, strict=True):
                _set_rng_state(state)
                out = embed(chunk)
                out.backward(leaf.grad[chunk.start:chunk.stop].to(out.dtype))
        _set_rng_state(after)
    return loss_fn(*leaves), finish
