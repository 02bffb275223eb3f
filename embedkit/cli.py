"""The ``embedkit`` command: info, embed, train, encode, index, search, eval, demo."""

from __future__ import annotations

import json
import logging
from typing import Annotated

import typer

from embedkit.attention import ATTENTION_MODES
from embedkit.pooling import pooling_names

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

ModelArg = Annotated[str, typer.Argument(help="Hub id, local HF folder, .gguf file, alias, or saved embedder.")]
AttentionOpt = Annotated[str, typer.Option(help=f"One of: {', '.join(ATTENTION_MODES)}.")]
PoolingOpt = Annotated[str, typer.Option(help=f"One of: {', '.join(pooling_names())}.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bfloat16 where fast, else float32), float32, bfloat16.")]
MaxLengthOpt = Annotated[int, typer.Option(help="Per-text token limit (longer texts are cut); default: the "
                                                "saved model's, else 512.")]
DimensionsOpt = Annotated[int, typer.Option(help="Matryoshka: keep the first N components (renormalised).")]

TokenPrependingOpt = Annotated[str, typer.Option(
    "--token-prepending", metavar="START:END",
    help="Token Prepending over decoder layers START..END-1 (0-based), e.g. 1:8: a <PST> placeholder in the "
         "prompt carries the last token's state in those layers; sets the prompt and last-token pooling.")]
TPPromptOpt = Annotated[str, typer.Option("--tp-prompt", help="Token Prepending prompt: prompteol, cot or ke.")]
TPOutputLayerOpt = Annotated[int, typer.Option("--tp-output-layer",
                                               help="Token Prepending early exit: embed after this many layers.")]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def open_embedder(model: str, attention: str | None = None, pooling: str | None = None, dtype: str = "auto",
                  max_length: int | None = None, **kwargs):
    """Open any model spec or saved folder with ``embedkit.embedder.open_model``'s one override policy."""
    from embedkit.embedder import open_model  # noqa: PLC0415

    return open_model(model, attention=attention, pooling=pooling, dtype=dtype, max_length=max_length, **kwargs)


def run_cli(func, *args, **kwargs):
    """Run a command body; known errors become one red line (exit 2), no traceback."""
    try:
        return func(*args, **kwargs)
    except (ValueError, TypeError, FileNotFoundError, OSError) as err:
        _fail(str(err))


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Turn any decoder-only LLM into a text encoder."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


@app.command()
def info(model: ModelArg, attention: AttentionOpt = None, pooling: PoolingOpt = None,
         dtype: DtypeOpt = "auto", max_length: MaxLengthOpt = None) -> None:
    """Architecture, parameters, layers, hidden size, attention, pooling, dtype."""
    def body():
        embedder = open_embedder(model, attention, pooling, dtype, max_length)
        cfg = embedder.backbone.config
        rows = {
            "model": model,
            "architecture": type(embedder.backbone).__name__,
            "model_type": cfg.model_type,
            "parameters": sum(p.numel() for p in embedder.parameters()),
            "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "attention": embedder.config.attention,
            "attn_implementation": getattr(cfg, "_attn_implementation", None),
            "pooling": embedder.config.pooling,
            "dtype": str(embedder.backbone.dtype).removeprefix("torch."),
            "max_length": embedder.config.max_length,
            "vocab_size": cfg.vocab_size,
        }
        width = max(map(len, rows))
        for key, value in rows.items():
            typer.echo(f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}")
    run_cli(body)


@app.command()
def embed(model: ModelArg, texts: Annotated[list[str], typer.Argument(help="Texts to embed.")],
          attention: AttentionOpt = None, pooling: PoolingOpt = None, dtype: DtypeOpt = "auto",
          max_length: MaxLengthOpt = None, dimensions: DimensionsOpt = None,
          instruction: Annotated[str, typer.Option(help="Prepended, attended to, not pooled.")] = None,
          as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
          token_prepending: TokenPrependingOpt = None, tp_prompt: TPPromptOpt = "prompteol",
          tp_output_layer: TPOutputLayerOpt = None) -> None:
    """Print the vectors of TEXT... (one per line, or JSON with --json)."""
    def body():
        embedder = open_embedder(model, attention, pooling, dtype, max_length)
        if token_prepending:
            from embedkit.methods.token_prepending import enable_from_option  # noqa: PLC0415

            enable_from_option(embedder, token_prepending, tp_prompt, tp_output_layer)
        vectors = embedder.encode(texts, instruction=instruction, dimensions=dimensions)
        if as_json:
            typer.echo(json.dumps({"model": model, "dimension": vectors.shape[1],
                                   "embeddings": [[round(float(x), 6) for x in v] for v in vectors]}))
        else:
            for text, vector in zip(texts, vectors, strict=True):
                typer.echo(f"{text[:40]!r}\t" + " ".join(f"{x:.5f}" for x in vector))
    run_cli(body)


@app.command()
def demo(data: Annotated[str, typer.Option(help="Data folder (default ../shared/data).")] = None,
         recipe: Annotated[str, typer.Option(help="Training recipe.")] = None,
         overrides: Annotated[list[str], typer.Option("--set", help="Recipe override key.sub=value.")] = None,
         train: Annotated[bool, typer.Option(help="Train (or reuse the recipe's output folder).")] = True) -> None:
    """The main job end to end: baselines, train the CPU recipe, STS-B before/after, encode+index+search, MTEB."""
    from embedkit.demo import DEFAULT_RECIPE, run_demo  # noqa: PLC0415

    run_cli(run_demo, data, recipe or DEFAULT_RECIPE, overrides or (), train=train, echo=typer.echo)


from embedkit.evaluation.cli import eval_app  # noqa: E402  (the eval command group lives with the harness)

app.add_typer(eval_app, name="eval")


from embedkit.train.cli import train as _train  # noqa: E402

app.command(name="train")(_train)

from embedkit.train.mine_cli import mine as _mine  # noqa: E402

app.command(name="mine")(_mine)

from embedkit.corpus.cli import register as _register_corpus  # noqa: E402

_register_corpus(app)  # encode, index build/info, search


@app.command()
def serve(model: ModelArg,
          index: Annotated[str, typer.Option(help="Index folder for /v1/search (built with this model).")] = None,
          host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")]
          = "127.0.0.1",
          port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
          api_key: Annotated[str, typer.Option(envvar="EMBEDKIT_API_KEY", show_default=False, help="Require "
                                               "'Authorization: Bearer KEY' on /v1/*.")] = None,
          model_name: Annotated[str, typer.Option(help="Name clients pass as `model` (default: the folder's "
                                                  "name or the spec).")] = None,
          attention: AttentionOpt = None, pooling: PoolingOpt = None, dtype: DtypeOpt = "auto",
          max_length: Annotated[int, typer.Option(help="Tokens per text (longer texts are truncated).")] = None,
          dimensions: Annotated[int, typer.Option(help="Matryoshka width of requests that give none.")] = None,
          threads: Annotated[int, typer.Option(help="Torch threads (default: the CPUs this process may use).")]
          = None,
          max_wait_ms: Annotated[float, typer.Option(help="Longest wait for requests to batch with.")] = 5.0,
          max_queue: Annotated[int, typer.Option(help="Texts queued for the model; beyond: 503.")] = 8192,
          max_texts: Annotated[int, typer.Option(help="Texts per request.")] = 2048,
          max_chars: Annotated[int, typer.Option(help="Characters per text.")] = 32_000,
          max_tokens: Annotated[int, typer.Option(help="Tokens per request.")] = 300_000,
          check_model: Annotated[bool, typer.Option("--check-model/--no-check-model", help="Refuse an --index "
                                                    "built by another model (fingerprint).")] = True) -> None:
    """Serve MODEL over HTTP: OpenAI's /v1/embeddings (and /v1/search with --index), with dynamic batching."""
    def body():
        from embedkit.serving import ServeSettings, default_model_name, model_loader  # noqa: PLC0415
        from embedkit.serving import serve as run_server  # noqa: PLC0415

        settings = ServeSettings.from_options(
            model_name=model_name or default_model_name(model), api_key=api_key or None, max_wait_ms=max_wait_ms,
            max_queue_texts=max_queue, max_texts_per_request=max_texts, max_chars_per_text=max_chars,
            max_tokens_per_request=max_tokens, default_dimensions=dimensions,
        )
        load = model_loader(model, index, threads=threads, check_model=check_model, attention=attention,
                            pooling=pooling, dtype=dtype, max_length=max_length)
        typer.echo(f"embedkit serve: {settings.model_name} on http://{host}:{port}/v1 (loading the model...)",
                   err=True)
        run_server(settings, load, host=host, port=port)
    run_cli(body)
