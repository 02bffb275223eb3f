"""How a run spans processes: plain ``torchrun`` (gloo / nccl, gradients summed here) or ``accelerate launch``
(accelerate wraps the adapter model: DDP, FSDP or DeepSpeed, as its config says).

Under accelerate, the embedder's backbone is swapped for a thin module that runs every forward through the
wrapper for the length of a stage; the objectives' own hooks (GEM's forward hook, attention schedules) stay
as they set them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

from embedkit import distributed

ACCELERATE_ENV = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_MIXED_PRECISION")


def launched_by_accelerate() -> bool:
    """``accelerate launch`` sets these; the run then lets accelerate wrap the model (DDP / FSDP / ZeRO)."""
    return any(name in os.environ for name in ACCELERATE_ENV)


class ThroughWrapper(nn.Module):
    """Stands in for the adapter model: forward goes through accelerate's wrapper (so its gradient hooks run),
    everything else (config, embeddings, modules) is the adapter model's."""

    def __init__(self, wrapped: nn.Module, inner: nn.Module):
        super().__init__()
        self.wrapped = wrapped
        object.__setattr__(self, "inner", inner)  # not a second registration of the same modules

    def forward(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


class Parallel:
    """This process's place in the run: rank, world size, and the accelerate wrapper if launched by it."""

    def __init__(self):
        self.accelerator = None
        if launched_by_accelerate():
            from accelerate import Accelerator  # noqa: PLC0415  (optional, heavy)

            self.accelerator = Accelerator()  # reads the launch config: FSDP / DeepSpeed / DDP plugins
        self.rank, self.world = distributed.init_from_env()
        self.main = self.rank == 0
        self.wrapped: nn.Module | None = None

    @contextlib.contextmanager
    def stage(self, embedder, peft_model: nn.Module) -> Iterator[None]:
        """While a stage trains: under accelerate, the embedder's forwards run through the wrapped model."""
        if self.accelerator is None:
            yield
            return
        self.wrapped = self.accelerator.prepare_model(peft_model)
        embedder.backbone = ThroughWrapper(self.wrapped, peft_model)
        try:
            yield
        finally:
            embedder.backbone = peft_model

    def sync(self, params: list[nn.Parameter], loss: float, tokens: int) -> tuple[float, int]:
        """Sum gradients, loss and token counts over processes (each process's loss is its share)."""
        if self.world == 1:
            return loss, tokens
        if self.accelerator is not None:
            for p in params:  # the wrapper averaged the gradients; our losses are shares of a sum
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.mul_(self.world)
        else:
            distributed.all_reduce_grads(params)
        loss, tokens = distributed.all_reduce_sum([loss, float(tokens)])
        return float(loss), int(tokens)

    def full_params(self) -> contextlib.AbstractContextManager:
        """The whole weights (FSDP shards them), to save and merge the adapter after a stage."""
        wrapped, self.wrapped = self.wrapped, None
        if wrapped is not None and type(wrapped).__name__ == "FullyShardedDataParallel":
            return type(wrapped).summon_full_params(wrapped, writeback=True)
        return contextlib.nullcontext()
