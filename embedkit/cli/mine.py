"""The ``embedkit mine EMBEDDER --input PAIRS --output TRIPLETS`` command (library: ``train/mining.py``).

The pairs are read and the options checked before the model loads, so bad input fails in a second.
"""

from __future__ import annotations

from typing import Annotated

import typer

from embedkit.cli.common import AttentionOpt, DtypeOpt, MaxLengthOpt, PoolingOpt, open_embedder, run_cli
from embedkit.train.mining import MiningOptions, mine_negatives, rank_range, read_pairs


def mine(
    model: Annotated[str, typer.Argument(help="The embedder that ranks candidates: hub id, local folder, alias, or "
                                              "saved embedder.")],
    inputs: Annotated[list[str], typer.Option("--input", "-i", help="Pairs file (.jsonl, .csv, .tsv, .parquet); "
                                              "repeat for several.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output .jsonl (written atomically; the work folder "
                                        "OUTPUT.mining/ beside it makes a rerun resume).")],
    anchor_column: Annotated[str, typer.Option(help="Column holding the anchor (query).")] = "anchor",
    positive_column: Annotated[str, typer.Option(help="Column holding the positive.")] = "positive",
    range_min: Annotated[int, typer.Option(help="Skip this many nearest candidates (likely false negatives).")] = 0,
    range_max: Annotated[int, typer.Option(help="Look no further than this rank (default 100, or every candidate "
                                           "of a smaller corpus).", show_default=False)] = None,
    margin: Annotated[float, typer.Option(help="Keep a candidate only if its score < the positive's score - "
                                          "MARGIN (cosine).")] = None,
    max_score: Annotated[float, typer.Option(help="Keep a candidate only if its score <= MAX_SCORE.")] = None,
    num_negatives: Annotated[int, typer.Option(help="Negatives per pair (nearest kept first).")] = 1,
    output_format: Annotated[str, typer.Option("--format", help="triplet: one {anchor, positive, negative} row per "
                                               "negative; n-tuple: one {anchor, positive, negatives} row per "
                                               "pair.")] = "triplet",
    query_instruction: Annotated[str, typer.Option(help="Instruction for the anchors (default: the model's query "
                                                   "instruction; '' for none).")] = None,
    index_type: Annotated[str, typer.Option(help="auto, flat (exact), hnsw, ivf, ivfpq.")] = "auto",
    chunk_size: Annotated[int, typer.Option(help="Pairs searched per saved chunk (the unit of resume).")] = 2048,
    batch_size: Annotated[int, typer.Option(help="Max texts per encode batch.")] = None,
    attention: AttentionOpt = None,
    pooling: PoolingOpt = None,
    dtype: DtypeOpt = "auto",
    max_length: MaxLengthOpt = None,
) -> None:
    """Mine hard negatives for (anchor, positive) pairs with an embedder: triplets for supervised training."""
    def body():
        options = MiningOptions(anchor_column=anchor_column, positive_column=positive_column, range_min=range_min,
                                range_max=range_max, margin=margin, max_score=max_score, num_negatives=num_negatives,
                                output_format=output_format, query_instruction=query_instruction,
                                index_type=index_type, chunk_size=chunk_size, batch_size=batch_size)
        pairs = read_pairs(inputs, options)
        rank_range(options, pairs)
        embedder = open_embedder(model, attention, pooling, dtype, max_length)

        def progress(number: int, total: int) -> None:
            typer.echo(f"chunk {number + 1}/{total} searched", err=True)

        result = mine_negatives(embedder, inputs, output, options, model_spec=model, pairs=pairs, on_chunk=progress)
        typer.echo(result.summary())

    run_cli(body)
