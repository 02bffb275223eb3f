"""The registry of embedder methods (Token Prepending, GEM, ...): the core's side of the plug-in contract.

A method registers ``apply(embedder, settings) -> settings with defaults filled`` under its name with
``@register_method(name)``, in the module that defines it. ``EmbedderConfig.methods`` maps names to
settings, so ``Embedder.load`` re-installs a saved embedder's methods through ``apply_methods``. The built-in
methods live in ``embedkit.methods``, which ``import embedkit`` imports, so they are registered before any
embedder loads; this module names none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MethodApply = Callable[[Any, dict], "dict | None"]
METHODS: dict[str, MethodApply] = {}


def register_method(name: str) -> Callable[[MethodApply], MethodApply]:
    """Decorator: register ``apply`` as the embedder method ``name``."""
    def wrap(apply: MethodApply) -> MethodApply:
        METHODS[name] = apply
        return apply

    return wrap


def method(name: str) -> MethodApply:
    """The registered ``apply`` of method ``name``; a one-line error listing the known ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r} in the embedder config; known: {sorted(METHODS)}.")
    return METHODS[name]


def apply_methods(embedder) -> None:
    """Install every method named in ``embedder.config.methods``."""
    for name, settings in embedder.config.methods.items():
        method(name)(embedder, settings)


def enable_method(embedder, name: str, settings: dict | None = None) -> None:
    """Install method ``name`` with ``settings`` and record it in the config (saved in embedkit.json), so what
    the embedder does now is what it does after ``save`` / ``load``."""
    resolved = method(name)(embedder, dict(settings or {}))
    embedder.config.methods[name] = dict(settings or {}) if resolved is None else resolved
