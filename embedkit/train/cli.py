"""The ``embedkit train RECIPE [key.sub=value ...] [--resume]`` command body.

Its error wrapper is its own (same contract as the other commands: a known error is one red line, exit 2)
so that train does not import ``embedkit.cli``; the lead unifies the wrappers when the CLIs move.
"""

from __future__ import annotations

from typing import Annotated

import typer

from embedkit.train.trainer import run_recipe


def train(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file (see recipes/).")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.sub=value overrides, e.g. stages.0.steps=10.")]
    = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in output_dir from its last checkpoint.")]
    = False,
) -> None:
    """Train an embedder from a recipe (MNTP, SimCSE, supervised contrastive on LoRA)."""
    try:
        final = run_recipe(recipe, overrides=overrides or [], resume=resume)
    except (ValueError, TypeError, FileNotFoundError, OSError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(f"trained embedder: {final}")
