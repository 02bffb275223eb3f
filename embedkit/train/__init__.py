"""Training: recipes (YAML, validated) -> stages, each an objective (MNTP, SimCSE, supervised, GEM; one file
each in ``objectives/``) -> a saved embedder. ``run_recipe`` is the entry point; ``embedkit train RECIPE`` is
its command."""

from embedkit.train.config import StageConfig
from embedkit.train.negatives import register_negative_selector
from embedkit.train.objectives import Objective, register_objective
from embedkit.train.recipe import Recipe, RecipeError, load_recipe
from embedkit.train.schedules import register_attention_schedule
from embedkit.train.trainer import run_recipe

__all__ = [
    "Objective", "Recipe", "RecipeError", "StageConfig", "load_recipe", "register_attention_schedule",
    "register_negative_selector", "register_objective", "run_recipe",
]
