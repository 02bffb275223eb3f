"""Training objectives, one file each (its config + its objective, registering itself).

Every module of this package is imported here, so adding an objective is adding a file; the registry in
``base.py`` names none of them.
"""

from __future__ import annotations

import importlib
import pkgutil

from embedkit.train.objectives.base import OBJECTIVES, Objective, ObjectiveContext, register_objective

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["OBJECTIVES", "Objective", "ObjectiveContext", "register_objective"]
