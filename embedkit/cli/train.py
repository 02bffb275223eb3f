"""The ``embedkit train RECIPE [key.sub=value ...] [--resume]`` command."""

from __future__ import annotations

from typing import Annotated

import typer

from embedkit.cli.common import run_cli
from embedkit.train.trainer import run_recipe


def train(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file (see recipes/).")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.sub=value overrides, e.g. stages.0.steps=10.")]
    = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in output_dir from its last checkpoint.")]
    = False,
) -> None:
    """Train an embedder from a recipe (MNTP, SimCSE, supervised contrastive on LoRA)."""
    final = run_cli(run_recipe, recipe, overrides=overrides or [], resume=resume)
    typer.echo(f"trained embedder: {final}")
