"""The optimiser a stage's ``optimizer`` section names, over its trainable parameters."""

from __future__ import annotations

import torch

from embedkit.train.config import OptimizerSpec
from embedkit.train.lora import require_bitsandbytes


def build_optimizer(spec: OptimizerSpec, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.name == "adamw_8bit":
        require_bitsandbytes()
        import bitsandbytes as bnb  # noqa: PLC0415

        return bnb.optim.AdamW8bit(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
