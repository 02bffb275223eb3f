"""The losses objectives return: one InfoNCE (temperature or learnable scale, negatives gathered across
processes with gradients) and GradCache towers.

Scaling convention: an objective returns a ``Loss`` whose ``value`` is a sum over this process's share of the
batch and whose ``count`` says how many units it sums (anchors, masked tokens; 1 for a local mean). The
trainer divides by the sum of ``count`` over processes, calls backward once, and sums gradients over
processes: one process with batch B and W processes with B/W each give the same loss and gradients.
"""

from __future__ import annotations

import hashlib
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


def text_keys(texts: Sequence[str]) -> torch.Tensor:
    """A stable 64-bit key per text (the same on every process, unlike ``hash``): equal texts, equal keys."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little",
                                        signed=True) for t in texts], dtype=torch.long)


@dataclass
class FalseNegatives:
    """In-batch candidates that are not negatives of an anchor, left out of its softmax (never its own positive).

    ``duplicates``: a candidate with the anchor's positive text (the same positive twice in the batch, or a hard
    negative equal to it), and the positive of another row with the same anchor text. ``margin``: a candidate
    whose cosine to the anchor exceeds the anchor's positive by more than ``margin`` (the guard of
    sentence-transformers' GISTEmbed / CachedGIST losses, ``margin_strategy="absolute"``, with the model itself
    as the guide). Keys (``text_keys``) are this process's rows: anchors, positives (n,), negatives (m,).
    ``counts`` adds up the candidates left out, per rule.
    """

    anchor_keys: torch.Tensor
    positive_keys: torch.Tensor
    negative_keys: torch.Tensor | None = None
    duplicates: bool = True
    margin: float | None = None
    counts: dict[str, int] | None = None

    def reversed(self) -> FalseNegatives:
        """The rule for the other direction of a symmetric loss, each positive against the anchors: the keys'
        roles swapped (an anchor text twice, or two rows sharing a positive), no hard negatives, not counted."""
        return FalseNegatives(self.positive_keys, self.anchor_keys, None, self.duplicates, self.margin, None)

    def excluded(self, cosine: torch.Tensor, labels: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor]
                 ) -> torch.Tensor:
        """(n, candidates) True where a candidate is left out; ``cosine`` is the anchors' (detached) cosine to
        the candidates, in ``info_nce``'s order (gathered positives, then gathered negatives)."""
        out = torch.zeros_like(cosine, dtype=torch.bool)
        device = cosine.device
        if self.duplicates:
            anchors, positives = gather(self.anchor_keys.to(device)), gather(self.positive_keys.to(device))
            keys = [positives] + ([gather(self.negative_keys.to(device))] if self.negative_keys is not None else [])
            candidates = torch.cat(keys)[: cosine.shape[1]]
            out |= candidates[None, :] == self.positive_keys.to(device)[:, None]
            out[:, : len(anchors)] |= anchors[None, :] == self.anchor_keys.to(device)[:, None]
        rows = torch.arange(len(labels), device=device)
        out[rows, labels] = False
        dropped = int(out.sum())
        if self.margin is not None:
            own = cosine[rows, labels]
            out |= cosine > own[:, None] + self.margin
            out[rows, labels] = False
        if self.counts is not None:
            self.counts["duplicates"] = self.counts.get("duplicates", 0) + dropped
            self.counts["margin"] = self.counts.get("margin", 0) + int(out.sum()) - dropped
        return out


def _gather_rows(tensor: torch.Tensor, size: int, with_grad: bool) -> torch.Tensor:
    """Every process's rows in rank order, when processes hold different numbers of rows (a batch mixing pairs
    and triplets): padded to the largest count for the collective, the padding then dropped."""
    if size == 1:
        return tensor
    counts = distributed.all_gather(torch.tensor([tensor.shape[0]], device=tensor.device)).tolist()
    top = max(counts)
    padded = torch.cat([tensor, tensor.new_zeros((top - tensor.shape[0], *tensor.shape[1:]))])
    gathered = distributed.gather_with_grad(padded) if with_grad else distributed.all_gather(padded)
    keep = torch.cat([torch.arange(top, device=tensor.device) < c for c in counts])
    return gathered[keep]


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None, *,
             temperature: float | None = None, scale: torch.Tensor | None = None, gather: bool = True,
             false_negatives: FalseNegatives | None = None) -> torch.Tensor:
    """InfoNCE summed over this process's anchors: each anchor against every positive and hard negative of the
    (global, with ``gather``) batch, cosine similarity / ``temperature`` (or times a learnable ``scale``: GEM),
    cross-entropy with the anchor's own positive as the target; ``false_negatives`` leaves candidates out.

    anchors, positives: (n, H) local rows; negatives: (m, H) or None (m may differ between processes, and
    be 0 on some).
    """
    if (temperature is None) == (scale is None):
        raise ValueError("info_nce takes a temperature or a scale, not both.")
    rank, size = (distributed.rank(), distributed.world_size()) if gather else (0, 1)
    candidates = [distributed.gather_with_grad(positives) if size > 1 else positives]
    if negatives is not None and (size > 1 or negatives.shape[0]):
        candidates.append(_gather_rows(negatives, size, with_grad=True))
    docs = F.normalize(torch.cat(candidates).float(), dim=-1)
    queries = F.normalize(anchors.float(), dim=-1)
    scores = queries @ docs.T / temperature if scale is None else scale * (queries @ docs.T)
    n = anchors.shape[0]
    labels = torch.arange(rank * n, rank * n + n, device=scores.device)
    if false_negatives is not None:
        excluded = false_negatives.excluded((queries @ docs.T).detach(), labels,
                                            lambda keys: _gather_rows(keys, size, with_grad=False))
        scores = scores.masked_fill(excluded, float("-inf"))
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
