"""The Pooler protocol and the registry every pooling registers itself in.

A pooling turns token states into one vector per text. Each one is a ``Pooler`` subclass, registered with
``@register_pooler``, that knows everything the rest of embedkit asks about it: how it pools, whether it has
trainable weights, whether the text needs an EOS appended, and how it is exported to a sentence-transformers
folder (a built-in ``Pooling`` mode, or its own module with ``save`` / ``load``). The embedder, the
sentence-transformers writer and the CLI read these; none of them names a pooling.

Every pooler reads a *pool mask*: the attention mask with instruction tokens zeroed, so instructions are
attended to but never pooled (sentence-transformers' ``include_prompt=False``). Poolers index by the mask, so
left and right padding give the same vectors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

POOLERS: dict[str, type[Pooler]] = {}

ST_POOLING_TYPE = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"


class Pooler(nn.Module):
    """Token states (B, L, H) -> vectors (B, H).

    Class attributes a subclass sets: ``name`` (the ``pooling=`` value), ``trainable`` (has weights that are
    trained and saved: built fresh by ``build``, reloaded by ``load_saved``), ``appends_eos`` (tokenization
    appends the EOS token, which sentence-transformers cannot reproduce), ``st_pooling_mode`` (the
    sentence-transformers ``Pooling`` mode that gives the same vectors; None for a pooler that saves itself as
    its own module, see ``save_module``).
    """

    name: ClassVar[str] = ""
    trainable: ClassVar[bool] = False
    appends_eos: ClassVar[bool] = False
    st_pooling_mode: ClassVar[str | None] = None
    module_folder: ClassVar[str] = "Pooling"  # the sentence-transformers module folder: 1_<module_folder>

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        """``attention_mask`` marks real tokens; ``pool_mask`` the ones that may be pooled."""
        raise NotImplementedError

    @classmethod
    def build(cls, hidden_size: int, settings: dict | None = None) -> Pooler:
        """A new pooler for a model of width ``hidden_size`` (a trainable one starts untrained)."""
        return cls()

    def settings(self) -> dict | None:
        """What ``EmbedderConfig.latent_attention`` records for this pooler (None: nothing to record)."""
        return None

    # -- sentence-transformers export --------------------------------------------------------------------------
    def save_module(self, folder: Path, dimension: int) -> str:
        """Write this pooler's sentence-transformers module into ``folder``; returns the module ``type`` for
        ``modules.json``. The default writes a built-in ``Pooling`` config with ``st_pooling_mode``."""
        if self.st_pooling_mode is None:
            raise NotImplementedError(f"pooling {self.name!r} must override save_module (no built-in mode).")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({
            "embedding_dimension": dimension, "pooling_mode": self.st_pooling_mode, "include_prompt": False,
        }, indent=2))
        return ST_POOLING_TYPE

    @classmethod
    def load_saved(cls, folder: Path) -> Pooler:
        """The pooler a saved embedder holds, from its module folder (only trainable poolers read it)."""
        return cls()


def register_pooler(cls: type[Pooler]) -> type[Pooler]:
    """Class decorator: make ``cls`` available as ``pooling=cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute 'name' to register as a pooling.")
    POOLERS[cls.name] = cls
    return cls


def pooling_names() -> tuple[str, ...]:
    """Every registered pooling, in registration order."""
    return tuple(POOLERS)


def pooler_class(name: str) -> type[Pooler]:
    """The registered class of pooling ``name``; a one-line error listing the valid ones otherwise."""
    if name not in POOLERS:
        raise ValueError(f"Unknown pooling {name!r}; valid: {', '.join(POOLERS)}.")
    return POOLERS[name]


def check_pooling(name: str) -> str:
    pooler_class(name)
    return name


_SHARED: dict[str, Pooler] = {}


def shared_pooler(name: str) -> Pooler:
    """One instance of a parameter-free pooling, shared by every embedder (it holds no state)."""
    cls = pooler_class(name)
    if cls.trainable:
        raise ValueError(f"pooling {name!r} has trained weights: it belongs to one embedder, not shared.")
    if name not in _SHARED or type(_SHARED[name]) is not cls:
        _SHARED[name] = cls.build(0)
    return _SHARED[name]
