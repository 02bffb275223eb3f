"""CLI commands ``encode``, ``index build``, ``index info``, ``index verify`` and ``search``; ``register(app)`` adds
them to the main typer app (embedkit/cli.py). Heavy imports happen inside the commands, so ``embedkit --help``
stays fast."""

from __future__ import annotations

import json
from typing import Annotated

import typer

index_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Build and inspect FAISS indexes over encoded vectors.")


def _helpers():
    from embedkit import cli as base  # noqa: PLC0415  (embedkit.cli imports this module at its end)

    return base


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
    base = _helpers()

    def body():
        from embedkit.corpus.encode import check_encode_options, distributed_rank, encode_corpus  # noqa: PLC0415
        from embedkit.corpus.manifest import shard_name  # noqa: PLC0415
        from embedkit.corpus.readers import ReaderOptions, check_inputs  # noqa: PLC0415

        check_inputs(inputs)  # fail on a missing file or a bad option before loading the model
        check_encode_options(vector_dtype, shard_size, batch_size, precision, dimensions)
        rank, world = distributed_rank()
        prefix = f"[rank {rank}/{world}] " if world > 1 else ""
        embedder = base.open_embedder(model, attention, pooling, dtype, max_length)
        if compile_layers:
            embedder.compile_layers()
        reader = ReaderOptions(text_field=text_field, id_field=id_field or None, title_field=title_field or None,
                               title_separator=title_separator)

        def progress(number: int, meta: dict) -> None:
            typer.echo(f"{prefix}{shard_name(number)}: {meta['count']} vectors"
                       + (f", {meta['skipped_empty']} empty rows skipped" if meta["skipped_empty"] else ""), err=True)

        result = encode_corpus(embedder, inputs, output, model_spec=model, reader=reader, role=role,
                               instruction=instruction, normalize=normalize, vector_dtype=vector_dtype,
                               precision=precision, dimensions=dimensions,
                               shard_size=shard_size, batch_size=batch_size, strict=strict, rank=rank,
                               world_size=world, on_shard=progress)
        typer.echo(prefix + result.summary())

    base.run_cli(body)


@index_app.command("build")
def index_build(
    vectors_dir: Annotated[str, typer.Argument(help="A finished `embedkit encode` output folder.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Index folder to write (replaced atomically).")],
    index_type: Annotated[str, typer.Option("--type", help="auto, or a registered index type: flat, hnsw, ivf, "
                                            "ivfpq, int8_flat, fp16_flat, binary_flat, binary_hnsw (and any "
                                            "plug-in's).")] = "auto",
    precision: Annotated[str, typer.Option(help="What the index stores: float32, float16, int8, uint8, binary or "
                                           "ubinary (compact codes; searches rescore with the vectors folder).")]
    = "float32",
    dimensions: Annotated[int, typer.Option(help="Matryoshka: index the first N components (renormalised); "
                                            "queries are encoded at that width.")] = None,
    metric: Annotated[str, typer.Option(help="ip or l2 (default: ip for normalised vectors, else l2).")] = None,
    target_recall: Annotated[float, typer.Option(help="Recall@10 the search settings are tuned to reach.")] = 0.95,
    nlist: Annotated[int, typer.Option(help="IVF lists (default ~sqrt(n)).")] = None,
    hnsw_m: Annotated[int, typer.Option(help="HNSW links per node.")] = 32,
    ef_construction: Annotated[int, typer.Option(help="HNSW build depth (lower: faster build, slower search).")] = 160,
    locality_order: Annotated[bool, typer.Option("--locality-order/--no-locality-order", help="HNSW: add rows "
                                                 "grouped by k-means cluster (faster build and search).")] = True,
    pq_m: Annotated[int, typer.Option(help="PQ sub-quantizers (must divide the dimension; default d/4).")] = None,
    train_size: Annotated[int, typer.Option(help="IVF training sample rows.")] = None,
    texts: Annotated[bool, typer.Option("--texts/--no-texts", help="Store the corpus texts for search "
                                        "results (when the input files are unchanged).")] = True,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check every shard's checksum "
                                         "first.")] = True,
) -> None:
    """Build a FAISS index (ids mapped, model manifest carried) from a vectors folder."""
    base = _helpers()

    def body():
        from embedkit.index import BuildOptions, build_index  # noqa: PLC0415

        options = BuildOptions(index_type=index_type, metric=metric, hnsw_m=hnsw_m, ef_construction=ef_construction,
                               locality_order=locality_order, nlist=nlist, pq_m=pq_m, train_size=train_size,
                               target_recall=target_recall, precision=precision, dimensions=dimensions)
        typer.echo(build_index(vectors_dir, output, options, texts=texts, verify=verify).summary())

    base.run_cli(body)


@index_app.command("verify")
def index_verify(index_dir: Annotated[str, typer.Argument(help="An index folder.")]) -> None:
    """Check every file of an index against the SHA-256 in its index.json; a bad file is named (exit 2)."""
    base = _helpers()

    def body():
        from embedkit.index import verify_index  # noqa: PLC0415

        info = verify_index(index_dir)
        typer.echo(f"OK: {index_dir}: all {len(info['files'])} files match their sha256 ({info['type']}, "
                   f"{info['count']} vectors).")

    base.run_cli(body)


@index_app.command("info")
def index_info(index_dir: Annotated[str, typer.Argument(help="An index folder.")],
               as_json: Annotated[bool, typer.Option("--json", help="Print index.json.")] = False) -> None:
    """What an index holds: type, size, model, search settings and their measured recall."""
    base = _helpers()

    def body():
        from embedkit.index import Index  # noqa: PLC0415

        index = Index.load(index_dir)
        info = index.info
        if as_json:
            typer.echo(json.dumps(info, indent=2))
            return
        cal = info["calibration"]
        rows = {
            "type": f"{info['type']} ({info['factory']})", "vectors": f"{info['count']:,} x {info['dimension']}",
            "metric": info["metric"],
            "precision": f"{info.get('precision', 'float32')}, {info.get('bytes_per_vector', '?')} bytes per vector"
                         + (f", rescoring {info['rescore_multiplier']} x k" if info.get("rescore_multiplier") else ""),
            "model": f"{info['model']['spec']} (fingerprint {info['model']['fingerprint']})",
            "search": ", ".join(f"{k}={v}" for k, v in info["search"].items()) or "exact",
            "recall@10": f"{cal['recall_at_10']:.3f} on {cal['probes']} corpus probes",
            "texts": "yes" if info["texts"] else f"no ({info.get('texts_note')})",
        }
        for key, value in rows.items():
            typer.echo(f"{key:<10} {value}")

    base.run_cli(body)


def search(
    index_dir: Annotated[str, typer.Argument(help="An index folder from `embedkit index build`.")],
    queries: Annotated[list[str], typer.Argument(help="Query text(s).")],
    k: Annotated[int, typer.Option("-k", "--k", help="Results per query.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ef_search: Annotated[int, typer.Option(help="HNSW search depth (default: calibrated).")] = None,
    nprobe: Annotated[int, typer.Option(help="IVF lists to visit (default: calibrated).")] = None,
    k_factor: Annotated[int, typer.Option(help="IVF-PQ exact re-ranking depth (default: calibrated).")] = None,
    rescore_multiplier: Annotated[int, typer.Option(help="Compact indexes: rescore this many times k candidates "
                                                    "with the float vectors (default: the index's, 4 for binary; "
                                                    "0 = off).")] = None,
    model: Annotated[str, typer.Option(help="Query model (default: the one that encoded the corpus).")] = None,
    check_model: Annotated[bool, typer.Option("--check-model/--no-check-model", help="Refuse a --model "
                                              "whose fingerprint differs from the index's.")] = True,
    verify: Annotated[bool, typer.Option("--verify", help="Hash every byte of the index files first (default: "
                                         "sizes and sampled blocks).")] = False,
) -> None:
    """Search an index with text queries, encoded as queries by the index's own model."""
    base = _helpers()

    def body():
        from embedkit.index import Index  # noqa: PLC0415

        embedder = None
        if model is not None:
            embedder = base.open_embedder(model)
        index = Index.load(index_dir, embedder=embedder, check_model=check_model, verify=verify)
        results = index.search(queries, k, ef_search=ef_search, nprobe=nprobe, k_factor=k_factor,
                               rescore_multiplier=rescore_multiplier)
        if as_json:
            typer.echo(json.dumps({"index": index_dir, "k": k, "results": [
                {"query": q, "hits": [h.to_dict() for h in hits]} for q, hits in zip(queries, results, strict=True)
            ]}, ensure_ascii=False))
            return
        for query, hits in zip(queries, results, strict=True):
            typer.echo(f"query: {query}")
            for rank, hit in enumerate(hits, start=1):
                text = "" if hit.text is None else "  " + " ".join(hit.text.split())[:100]
                typer.echo(f"{rank:>3}. {hit.score:.4f}  {hit.id}{text}")

    base.run_cli(body)


def register(app: typer.Typer) -> None:
    """Add encode, index (build, info, verify) and search to the main app."""
    app.command("encode")(encode)
    app.add_typer(index_app, name="index")
    app.command("search")(search)
