"""Per-step schedules: the learning-rate factor, and the registry of attention schedules.

An attention schedule is registered with ``@register_attention_schedule("name")`` on a factory
``(settings: dict, stage_config, total_steps) -> callable(step, embedder)``; the trainer calls the result before
every step, and it sets ``embedder.attention_bias`` (the trainer clears it when the stage ends). The built-in
``soft_mask`` (the soft causal -> bidirectional transition of ``embedkit.methods.soft_mask``) registers here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from embedkit.methods.soft_mask import schedule_from_settings

ATTENTION_SCHEDULES: dict[str, Callable] = {}


def register_attention_schedule(name: str) -> Callable[[Callable], Callable]:
    def wrap(factory: Callable) -> Callable:
        ATTENTION_SCHEDULES[name] = factory
        return factory

    return wrap


register_attention_schedule("soft_mask")(schedule_from_settings)


def lr_factor(name: str, step: int, total: int, warmup: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if name == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if name == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
