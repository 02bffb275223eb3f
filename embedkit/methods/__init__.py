"""Methods beyond plain pooling (Token Prepending, GEM, soft mask): small adapters over the core's hooks.

Each method registers an ``apply(embedder, settings) -> settings with defaults filled`` under its name;
``EmbedderConfig.methods`` maps names to settings, so a saved embedder re-installs its methods on load.
``enable`` records a method in the config and installs it, so whatever the embedder does now is what it will
do after ``save`` / ``load``. Built-in methods live in this package's modules and register on import;
``apply_methods`` imports them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

METHODS: dict[str, Callable] = {}

# method name -> module that registers it (imported on first use, so importing embedkit stays light)
BUILTIN_MODULES = {
    "token_prepending": "embedkit.methods.token_prepending",
    "gem": "embedkit.methods.gem",
}


def register(name: str) -> Callable[[Callable], Callable]:
    def wrap(apply: Callable) -> Callable:
        METHODS[name] = apply
        return apply

    return wrap


def _lookup(name: str) -> Callable:
    if name not in METHODS and name in BUILTIN_MODULES:
        importlib.import_module(BUILTIN_MODULES[name])
    if name not in METHODS:
        known = sorted(set(METHODS) | set(BUILTIN_MODULES))
        raise ValueError(f"Unknown method {name!r} in the embedder config; known: {known}.")
    return METHODS[name]


def apply_methods(embedder) -> None:
    """Install every method named in ``embedder.config.methods``."""
    for name, settings in embedder.config.methods.items():
        _lookup(name)(embedder, settings)


def enable(embedder, name: str, settings: dict | None = None) -> None:
    """Install method ``name`` with ``settings`` and record it in the config (saved in embedkit.json)."""
    resolved = _lookup(name)(embedder, dict(settings or {}))
    embedder.config.methods[name] = dict(settings or {}) if resolved is None else resolved
