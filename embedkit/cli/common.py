"""What every command shares: the one error contract (``run_cli``), the one way to open a model
(``open_embedder``) and the option types several command groups declare."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, NoReturn, TypeVar

import typer

from embedkit.attention import ATTENTION_MODES
from embedkit.embedder import Embedder, open_model
from embedkit.pooling import pooling_names

T = TypeVar("T")

# errors a user can cause and fix (bad option, missing file, unreadable data): one red line, never a traceback
KNOWN_ERRORS = (ValueError, TypeError, FileNotFoundError, OSError)

ModelArg = Annotated[str, typer.Argument(help="Hub id, local HF folder, .gguf file, alias, or saved embedder.")]
AttentionOpt = Annotated[str, typer.Option(help=f"One of: {', '.join(ATTENTION_MODES)}.")]
PoolingOpt = Annotated[str, typer.Option(help=f"One of: {', '.join(pooling_names())}.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bfloat16 where fast, else float32), float32, bfloat16.")]
MaxLengthOpt = Annotated[int, typer.Option(help="Per-text token limit (longer texts are cut); default: the "
                                                "saved model's, else 512.")]
DimensionsOpt = Annotated[int, typer.Option(help="Matryoshka: keep the first N components (renormalised).")]


def fail(message: str) -> NoReturn:
    """Print ``error: MESSAGE`` in red on stderr and exit with status 2."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_cli(func: Callable[..., T], *args, debug: bool | None = None, **kwargs) -> T:
    """Run a command body under the CLI's one error contract: an error becomes one red line, exit 2.

    Commands without a ``--debug`` option (``debug=None``) turn the errors a user can fix (``KNOWN_ERRORS``) into
    their message and let anything else keep its traceback (a bug). Commands with ``--debug`` (eval: long runs
    inside mteb, whose errors are many types) turn every error into its first line, naming the type when it is
    not a plain bad-input error; ``--debug`` shows the traceback instead.
    """
    if debug is None:
        try:
            return func(*args, **kwargs)
        except KNOWN_ERRORS as err:
            fail(str(err))
    try:
        return func(*args, **kwargs)
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        fail("interrupted")
    except Exception as err:  # noqa: BLE001 - the CLI's one-line error contract
        if debug:
            raise
        fail(first_line(err) + ("" if isinstance(err, ValueError | FileNotFoundError) else
                                f" ({type(err).__name__}; rerun with --debug for the traceback)"))


def open_embedder(model: str, attention: str | None = None, pooling: str | None = None, dtype: str = "auto",
                  max_length: int | None = None, **kwargs) -> Embedder:
    """Open any model spec or saved folder with ``embedkit.embedder.open_model``'s one override policy."""
    return open_model(model, attention=attention, pooling=pooling, dtype=dtype, max_length=max_length, **kwargs)
