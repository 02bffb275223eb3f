"""The ``embedkit encode`` command: corpus files into a sharded, resumable vectors folder."""

from __future__ import annotations

from typing import Annotated

import typer

from embedkit.cli.common import open_embedder, run_cli
from embedkit.corpus.encode import check_encode_options, encode_corpus
from embedkit.corpus.manifest import shard_name
from embedkit.corpus.readers import ReaderOptions, check_inputs
from embedkit.distributed import launch_rank


# typer reads each option's declaration from the signature, so the 20 options make this function long
def encode(
    model: Annotated[str, typer.Argument(help="Hub id, local HF folder, .gguf file, alias, or saved embedder.")],
    inputs: Annotated[list[str], typer.Option("--input", "-i", help="Input file (.jsonl, .csv, .tsv, .parquet, "
                                              ".txt or a BEIR corpus.jsonl); repeat for several.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Vectors folder (created; rerun to resume).")],
    text_field: Annotated[str, typer.Option(help="Field / column holding the text.")] = "text",
    id_field: Annotated[str, typer.Option(help="Field holding the id (default: BEIR _id if present, else the "
                                          "row number).")] = None,
    title_field: Annotated[str, typer.Option(help="Field joined before the text when present (BEIR title); "
                                             "'' disables.")] = "title",
    title_separator: Annotated[str, typer.Option(help="Between title and text.")] = " ",
    instruction: Annotated[str, typer.Option(help="Prepended to every text (overrides --role).")] = None,
    role: Annotated[str, typer.Option(help="document (default) or query: which of the model's instructions "
                                      "to use.")] = "document",
    vector_dtype: Annotated[str, typer.Option(help="float32 or float16 shards (older name of --precision).")]
    = "float32",
    precision: Annotated[str, typer.Option(help="Shards hold float32, float16, int8, uint8 (ranges calibrated on "
                                           "a sample), binary or ubinary codes (sentence-transformers' "
                                           "quantize_embeddings).")] = None,
    dimensions: Annotated[int, typer.Option(help="Matryoshka: keep the first N components (renormalised).")] = None,
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize", help="Default: the model's setting.",
                                            show_default=False)] = None,
    shard_size: Annotated[int, typer.Option(help="Input rows per shard (the unit of resume and of splitting "
                                            "across processes).")] = 10_000,
    batch_size: Annotated[int, typer.Option(help="Max texts per batch (batches are cut by a token budget).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Empty texts are an error instead of skipped.")] = False,
    attention: Annotated[str, typer.Option(help="causal or bidirectional (default: the model's).")] = None,
    pooling: Annotated[str, typer.Option(help="Pooling (default: the model's, else mean).")] = None,
    dtype: Annotated[str, typer.Option(help="Model dtype: auto, float32, bfloat16.")] = "auto",
    max_length: Annotated[int, typer.Option(help="Max tokens per text (default: the model's, else 512).")] = None,
    compile_layers: Annotated[bool, typer.Option("--compile", help="torch.compile the decoder layers: faster on "
                                                 "large corpora, ~1 min to compile first.")] = False,
) -> None:
    """Encode corpus files into a sharded, resumable vectors folder (works under torchrun)."""
    def body():
        check_inputs(inputs)  # fail on a missing file or a bad option before loading the model
        check_encode_options(vector_dtype, shard_size, batch_size, precision, dimensions)
        rank, world = launch_rank()
        prefix = f"[rank {rank}/{world}] " if world > 1 else ""
        embedder = open_embedder(model, attention, pooling, dtype, max_length)
        if compile_layers:
            embedder.compile_layers()
        reader = ReaderOptions(text_field=text_field, id_field=id_field or None, title_field=title_field or None,
                               title_separator=title_separator)

        def progress(number: int, meta: dict) -> None:
            typer.echo(f"{prefix}{shard_name(number)}: {meta['count']} vectors"
                       + (f", {meta['skipped_empty']} empty rows skipped" if meta["skipped_empty"] else ""), err=True)

        result = encode_corpus(embedder, inputs, output, model_spec=model, reader=reader, role=role,
                               instruction=instruction, normalize=normalize, vector_dtype=vector_dtype,
                               precision=precision, dimensions=dimensions, shard_size=shard_size,
                               batch_size=batch_size, strict=strict, rank=rank, world_size=world, on_shard=progress)
        typer.echo(prefix + result.summary())

    run_cli(body)
