"""Methods beyond plain pooling (Token Prepending, GEM, soft mask): small adapters over the core's hooks.

Each method registers an ``apply(embedder, settings)`` under its name; ``EmbedderConfig.methods`` maps names
to settings, so a saved embedder re-installs its methods on load.
"""

from __future__ import annotations

from collections.abc import Callable

METHODS: dict[str, Callable] = {}


def register(name: str) -> Callable[[Callable], Callable]:
    def wrap(apply: Callable) -> Callable:
        METHODS[name] = apply
        return apply

    return wrap


def apply_methods(embedder) -> None:
    """Install every method named in ``embedder.config.methods``."""
    for name, settings in embedder.config.methods.items():
        if name not in METHODS:
            raise ValueError(f"Unknown method {name!r} in the embedder config; known: {sorted(METHODS)}.")
        METHODS[name](embedder, settings)
