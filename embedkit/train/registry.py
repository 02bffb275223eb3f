"""Registries that later work plugs into without touching the trainer.

* stages: ``@register_stage("mntp", config=MNTPConfig)`` on a ``Stage`` subclass. A recipe's
  ``objective`` picks one; its config class (a ``StageConfig`` subclass) validates the stage's keys.
* attention schedules: ``@register_attention_schedule("name")`` on a factory
  ``(settings: dict, stage_config, total_steps) -> callable(step, embedder)``; the trainer calls the result
  before every step, and it sets ``embedder.attention_bias`` (e.g. a soft causal->bidirectional transition).
* negative selectors: ``@register_negative_selector("name")`` on a factory ``(settings: dict) ->
  callable(stage, rows) -> list[list[str]]`` giving the hard negatives of each supervised row (the default
  reads them from the data; mining can replace it).
"""

from __future__ import annotations

from collections.abc import Callable

STAGES: dict[str, tuple[type, type]] = {}  # objective -> (Stage class, StageConfig class)
ATTENTION_SCHEDULES: dict[str, Callable] = {}
NEGATIVE_SELECTORS: dict[str, Callable] = {}


def register_stage(name: str, *, config: type) -> Callable[[type], type]:
    """Register a training stage class under ``name`` with the pydantic config class that validates it."""
    def wrap(cls: type) -> type:
        STAGES[name] = (cls, config)
        cls.objective = name
        return cls

    return wrap


def register_attention_schedule(name: str) -> Callable[[Callable], Callable]:
    def wrap(factory: Callable) -> Callable:
        ATTENTION_SCHEDULES[name] = factory
        return factory

    return wrap


def register_negative_selector(name: str) -> Callable[[Callable], Callable]:
    def wrap(factory: Callable) -> Callable:
        NEGATIVE_SELECTORS[name] = factory
        return factory

    return wrap


def load_builtins() -> None:
    """Import the modules whose import registers the built-in stages and selectors."""
    import embedkit.methods.training  # noqa: F401, PLC0415  (soft_mask schedule, dynamic negatives, gem stage)
    import embedkit.train.stages  # noqa: F401, PLC0415
