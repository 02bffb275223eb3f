"""The harness of the distributed loss tests: a loss computed on 2 gloo processes, each on its share of the rows,
must give the one-process loss and gradients once both are summed over the processes."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# (rank, world, weight) -> this process's losses; a module-level function or a partial of one (it is pickled)
LossesOf = Callable[[int, int, torch.Tensor], Sequence[torch.Tensor]]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(rank: int, world: int, port: int, losses_of: LossesOf, weight: torch.Tensor, out: torch.Tensor) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        w = weight.clone().requires_grad_(True)
        for i, loss in enumerate(losses_of(rank, world, w)):
            grad = torch.autograd.grad(loss, [w], retain_graph=True)[0]
            dist.all_reduce(grad)
            total = loss.detach().clone()
            dist.all_reduce(total)
            out[rank, i] = torch.cat([total.view(1), grad.flatten()])
    finally:
        dist.destroy_process_group()


def assert_processes_match_one(losses_of: LossesOf, single: Sequence[torch.Tensor], weight: torch.Tensor,
                               leaf: torch.Tensor, world: int = 2, atol: float = 1e-5) -> None:
    """Run ``losses_of`` on ``world`` processes; each summed loss and gradient must equal the one-process
    ``single`` losses (computed with ``leaf``, a grad-requiring copy of ``weight``) and their gradients."""
    out = torch.zeros(world, len(single), 1 + weight.numel()).share_memory_()
    mp.spawn(_worker, args=(world, free_port(), losses_of, weight, out), nprocs=world, join=True)  # fork deadlocks gloo
    for i, loss in enumerate(single):
        grad = torch.autograd.grad(loss, [leaf], retain_graph=True)[0]
        for rank in range(world):
            assert abs(out[rank, i, 0].item() - loss.item()) < atol
            assert torch.allclose(out[rank, i, 1:], grad.flatten(), atol=atol)
