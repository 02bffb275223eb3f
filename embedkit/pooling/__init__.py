"""Pooling: token states -> one vector per text. One class per pooling, each registered where it is defined.

Adding a pooling is one ``Pooler`` subclass with ``@register_pooler`` in a module of this package (imported
here automatically) or anywhere else that is imported before the pooling is used; see ``base.py``.
"""

from __future__ import annotations

import importlib
import pkgutil

from embedkit.pooling.base import (
    POOLERS,
    Pooler,
    check_pooling,
    pooler_class,
    pooling_names,
    register_pooler,
    shared_pooler,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from embedkit.pooling.latent import LatentAttentionConfig, LatentAttentionPooling  # noqa: E402

# The built-in poolings at import time (kept for ``train/recipe.py``'s Literal; prefer ``pooling_names()``,
# which also lists poolings registered later).
POOLING_MODES = pooling_names()

__all__ = ["POOLERS", "POOLING_MODES", "LatentAttentionConfig", "LatentAttentionPooling", "Pooler", "check_pooling",
           "pooler_class", "pooling_names", "register_pooler", "shared_pooler"]
