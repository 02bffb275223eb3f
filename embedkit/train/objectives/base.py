"""The Objective protocol and its registry.

An objective is one file in this package: its pydantic config (a ``StageConfig`` subclass: the stage's own
keys) and its class, registered with ``@register_objective("name", config=MyConfig)``. It reads and checks
its data (before the model loads), tokenizes it (after), and returns the ``Loss`` of this process's rows for
a step; the trainer owns backward, the share-of-global-batch scaling, gradient sync, the optimiser,
checkpoints and logging. Random choices derive from (seed, stage, step, row), so runs replay exactly after a
resume and give the same global batch on any number of processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from torch import nn

from embedkit.train.config import StageConfig
from embedkit.train.data import DataError, resolve_path
from embedkit.train.losses import Loss
from embedkit.train.sources import read_stage_texts

OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(name: str, *, config: type[StageConfig]) -> Callable[[type], type]:
    """Register an ``Objective`` subclass under ``name`` with the config class that validates its stages."""
    def wrap(cls: type) -> type:
        cls.name, cls.config_class = name, config
        OBJECTIVES[name] = cls
        return cls

    return wrap


@dataclass
class ObjectiveContext:
    """What the trainer hands an objective."""

    embedder: object  # embedkit.Embedder; its backbone is the peft-wrapped model during the stage
    tokenizer: object
    index: int  # the stage's position in the recipe
    seed: int
    data_dir: Path | None
    recipe_dir: Path | None
    max_length: int
    causal_lm: nn.Module | None = None  # the model with its LM head, sharing the backbone's weights
    run_dir: Path | None = None  # the run's output folder (caches that a resume reuses); None: keep in memory


class Objective:
    """Base class. Subclasses set ``needs_lm_head`` and implement ``check_data``, ``prepare``, ``num_rows`` and
    ``loss``; the other hooks have do-nothing defaults."""

    name: ClassVar[str] = "?"
    config_class: ClassVar[type[StageConfig]] = StageConfig
    needs_lm_head: ClassVar[bool] = False

    def __init__(self, config: StageConfig, ctx: ObjectiveContext):
        self.config, self.ctx = config, ctx

    @classmethod
    def data_paths(cls, config: StageConfig, data_dir: Path | None, recipe_dir: Path | None) -> list[Path]:
        """The stage's files, for objectives that read only the original ``data: {paths: [...]}`` form."""
        if not hasattr(config.data, "paths"):
            raise DataError(f"objective {config.objective!r} reads data: {{paths: [...]}} only, not a list of "
                            "sources; give its files as data.paths.")
        return [resolve_path(p, data_dir, recipe_dir) for p in config.data.paths]

    @classmethod
    def check_data(cls, config: StageConfig, data_dir: Path | None, recipe_dir: Path | None) -> int:
        """Read the stage's files and return the row count; raise DataError naming file and line."""
        raise NotImplementedError

    @classmethod
    def count_texts(cls, config: StageConfig, data_dir: Path | None, recipe_dir: Path | None) -> int:
        """``check_data`` for objectives that read plain texts: every file read, the texts counted."""
        return len(cls.read_all_texts(config, data_dir, recipe_dir))

    @classmethod
    def read_all_texts(cls, config: StageConfig, data_dir: Path | None, recipe_dir: Path | None) -> list[str]:
        """Every source's texts in order (a list of sources: weights apply only where the objective batches by
        source, as the contrastive ones do)."""
        return read_stage_texts(config.data, data_dir, recipe_dir).texts

    @classmethod
    def check_model(cls, config: StageConfig, embedder) -> str | None:
        """A one-line problem of this stage with the loaded model (e.g. a width it lacks), checked for every stage
        before the first trains; None when fine."""
        return None

    def setup_model(self) -> None:
        """Before the LoRA adapter is added (e.g. add tokens and resize the embeddings)."""

    def prepare(self) -> None:
        """Tokenize (the model is loaded)."""

    def prepare_steps(self, rows: Sequence[int]) -> None:
        """Once before the first step: every row the stage's steps use (all steps, all processes, so a resumed
        run sees the same rows). Work per row that the steps need, such as teacher vectors, is done here for
        these rows only: a short stage on a large mixture touches a fraction of it."""

    def num_rows(self) -> int:
        raise NotImplementedError

    def groups(self) -> list[str] | None:
        """Per-row group names when batches must come from one group (same-source batches)."""
        return None

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters besides the LoRA adapter that this objective trains."""
        return []

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Settings in force while the stage trains (dropout); restored afterwards."""
        yield

    def loss(self, rows: Sequence[int], step: int) -> Loss:
        """The loss of this process's ``rows`` at ``step`` (the trainer scales it and calls backward)."""
        raise NotImplementedError

    def report(self) -> dict:
        """Figures gathered while training (e.g. negatives replaced by mining), logged at the stage's end."""
        return {}


def row_rng(seed: int, stage: int, step: int, row: int, *stream: int) -> np.random.Generator:
    """The random generator of one row at one step: the same on any process and after a resume."""
    return np.random.default_rng([seed, stage, step, row, *stream])
