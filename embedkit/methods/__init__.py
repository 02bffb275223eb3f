"""Methods beyond plain pooling (Token Prepending, GEM, soft mask): small adapters over the core's hooks.

Each method registers itself in the core's registry (``embedkit.method_registry``) where it is defined;
``EmbedderConfig.methods`` maps names to settings, so a saved embedder re-installs its methods on load.
Importing this package imports every module in it (``import embedkit`` does), so adding a method is adding a
file here.
"""

from __future__ import annotations

import importlib
import pkgutil

from embedkit.method_registry import METHODS, apply_methods, enable_method, register_method

# the names methods have used so far (and other packages import)
register = register_method
enable = enable_method

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "apply_methods", "enable", "enable_method", "register", "register_method"]
