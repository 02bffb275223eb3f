"""The embedkit command: info, embed, demo, eval, train, mine, encode, index, search, serve."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from embedkit.cli.corpus import encode
from embedkit.cli.demo import demo
from embedkit.cli.eval import eval_app
from embedkit.cli.index import index_app, search
from embedkit.cli.mine import mine
from embedkit.cli.model import embed, info, serve
from embedkit.cli.train import train

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Turn any decoder-only LLM into a text encoder."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


# the order of `embedkit --help`
app.command()(info)
app.command()(embed)
app.command()(demo)
app.add_typer(eval_app, name="eval")
app.command()(train)
app.command()(mine)
app.command()(encode)
app.add_typer(index_app, name="index")
app.command()(search)
app.command()(serve)
