"""Training: recipes (YAML, validated) -> stages (MNTP, SimCSE, supervised; registry for more) -> a saved
embedder. ``run_recipe`` is the entry point; ``embedkit train RECIPE`` is its command."""

from embedkit.train.recipe import Recipe, RecipeError, StageConfig, load_recipe
from embedkit.train.registry import register_attention_schedule, register_negative_selector, register_stage
from embedkit.train.trainer import run_recipe

__all__ = [
    "Recipe", "RecipeError", "StageConfig", "load_recipe", "register_attention_schedule",
    "register_negative_selector", "register_stage", "run_recipe",
]
