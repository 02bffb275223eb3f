"""Commands over one model: ``info``, ``embed`` and ``serve``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from embedkit.cli.common import (
    AttentionOpt,
    DimensionsOpt,
    DtypeOpt,
    MaxLengthOpt,
    ModelArg,
    PoolingOpt,
    open_embedder,
    run_cli,
)
from embedkit.methods.token_prepending import enable_from_option
from embedkit.serving import ServeSettings, default_model_name, model_loader
from embedkit.serving import serve as run_server

TokenPrependingOpt = Annotated[str, typer.Option(
    "--token-prepending", metavar="START:END",
    help="Token Prepending over decoder layers START..END-1 (0-based), e.g. 1:8: a <PST> placeholder in the "
         "prompt carries the last token's state in those layers; sets the prompt and last-token pooling.")]
TPPromptOpt = Annotated[str, typer.Option("--tp-prompt", help="Token Prepending prompt: prompteol, cot or ke.")]
TPOutputLayerOpt = Annotated[int, typer.Option("--tp-output-layer",
                                               help="Token Prepending early exit: embed after this many layers.")]



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
            enable_from_option(embedder, token_prepending, tp_prompt, tp_output_layer)
        vectors = embedder.encode(texts, instruction=instruction, dimensions=dimensions)
        if as_json:
            typer.echo(json.dumps({"model": model, "dimension": vectors.shape[1],
                                   "embeddings": [[round(float(x), 6) for x in v] for v in vectors]}))
        else:
            for text, vector in zip(texts, vectors, strict=True):
                typer.echo(f"{text[:40]!r}\t" + " ".join(f"{x:.5f}" for x in vector))
    run_cli(body)


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
          packed: Annotated[bool, typer.Option("--packed/--no-packed", help="Run merged batches as packed "
                                               "forwards (no padding) when the model allows it.")] = True,
          check_model: Annotated[bool, typer.Option("--check-model/--no-check-model", help="Refuse an --index "
                                                    "built by another model (fingerprint).")] = True) -> None:
    """Serve MODEL over HTTP: OpenAI's /v1/embeddings (and /v1/search with --index), with dynamic batching."""
    def body():
        settings = ServeSettings.from_options(
            model_name=model_name or default_model_name(model), api_key=api_key or None, max_wait_ms=max_wait_ms,
            max_queue_texts=max_queue, max_texts_per_request=max_texts, max_chars_per_text=max_chars,
            max_tokens_per_request=max_tokens, default_dimensions=dimensions, packed=packed,
        )
        load = model_loader(model, index, threads=threads, check_model=check_model, attention=attention,
                            pooling=pooling, dtype=dtype, max_length=max_length)
        typer.echo(f"embedkit serve: {settings.model_name} on http://{host}:{port}/v1 (loading the model...)",
                   err=True)
        run_server(settings, load, host=host, port=port)
    run_cli(body)
