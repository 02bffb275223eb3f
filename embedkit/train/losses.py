"""Contrastive losses with negatives gathered across processes (gradients flow back), and a cached-gradient
(GradCache) mode that gives the same loss and gradients as the whole batch at once with the activation memory
of a mini-batch.

Scaling convention: every process returns its anchors' summed loss divided by the *global* batch size, and
the trainer sums gradients over processes. One process with batch B and W processes with B/W each then give
the same loss and the same gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient for this process's slice.

    Our own (not torch.distributed.nn's) so that it works on gloo, which has no reduce_scatter."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        ctx.rank, ctx.n = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every process in rank order; gradients reach the process that owns a row."""
    if world()[1] == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def contrastive_loss(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None,
                     temperature: float, gather: bool = True) -> torch.Tensor:
    """InfoNCE: each anchor against every positive and hard negative of the (global) batch.

    anchors, positives: (n, H) local rows; negatives: (n * k, H) or None. Cosine similarity / temperature,
    cross-entropy with the anchor's own positive as the target. Returns sum over local anchors / global n.
    """
    rank, size = world() if gather else (0, 1)
    all_pos = gather_with_grad(positives) if size > 1 else positives
    candidates = [all_pos]
    if negatives is not None and negatives.shape[0]:
        candidates.append(gather_with_grad(negatives) if size > 1 else negatives)
    docs = F.normalize(torch.cat(candidates).float(), dim=-1)
    queries = F.normalize(anchors.float(), dim=-1)
    scores = queries @ docs.T / temperature
    n = anchors.shape[0]
    labels = torch.arange(rank * n, rank * n + n, device=scores.device)
    return F.cross_entropy(scores, labels, reduction="sum") / (n * size)


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


def run_towers(towers: Sequence[tuple[EmbedFn, int]], loss_fn: Callable[..., torch.Tensor],
               mini_batch_size: int | None = None) -> float:
    """Embed each tower (``(embed_fn, n_rows)``), compute ``loss_fn(*embeddings)`` and backpropagate.

    With ``mini_batch_size`` this is GradCache (Gao et al. 2021): embed every chunk without a graph (saving
    its RNG state so dropout repeats), take the loss and its gradient w.r.t. the embeddings, then re-embed
    each chunk with a graph and backpropagate that cached gradient. Same loss and gradients, less memory.
    Returns the loss value.
    """
    if mini_batch_size is None:
        embeddings = [embed(range(n)) for embed, n in towers]
        loss = loss_fn(*embeddings)
        loss.backward()
        return float(loss.detach())
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
    loss = loss_fn(*leaves)
    loss.backward()
    after = _rng_state()
    for (embed, n), tower_states, leaf in zip(towers, states, leaves, strict=True):
        for chunk, state in zip(_chunks(n, mini_batch_size), tower_states, strict=True):
            _set_rng_state(state)
            out = embed(chunk)
            grad = leaf.grad[chunk.start:chunk.stop].to(out.dtype)
            out.backward(grad)
    _set_rng_state(after)
    return float(loss.detach())
