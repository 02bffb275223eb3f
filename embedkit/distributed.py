"""Process-group helpers: rank, world size, barrier, gather and all-reduce, in one place.

Everything here works without a process group (one process: rank 0 of 1, collectives are the identity), so
callers need no ``if distributed`` branches. Gloo on CPU has no reduce_scatter, hence the own gather with
gradients below.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def launch_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, without joining a process group (corpus encode splits
    shards by rank and needs no collectives); (0, 1) when not launched by torchrun."""
    rank_, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1 or not 0 <= rank_ < world:
        raise ValueError(f"Bad distributed environment RANK={rank_} WORLD_SIZE={world}.")
    return rank_, world


def init_from_env() -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl on GPU); (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return rank(), world_size()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """The sum over processes of each value (float64 on the wire: token counts stay exact)."""
    if world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over processes (a missing gradient counts as zeros)."""
    if world_size() == 1:
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad)


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped ``tensor`` from every process in rank order (no gradient)."""
    size = world_size()
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient for this process's slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.n = rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every process in rank order; gradients reach the process that owns a row."""
    if world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)
