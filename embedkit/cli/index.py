"""The ``embedkit index build|info|verify`` commands and ``embedkit search`` over an index folder."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from embedkit.cli.common import open_embedder, run_cli
from embedkit.index import BuildOptions, Index, build_index, verify_index

index_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Build and inspect FAISS indexes over encoded vectors.")


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
    binary_threshold: Annotated[str, typer.Option(help="Binary: bits of x - t per dimension, t zero "
                                                  "(sentence-transformers' x > 0), mean or median (calibrated on a "
                                                  "sample). Default: mean.")] = None,
    binary_rotation: Annotated[bool, typer.Option("--binary-rotation/--no-binary-rotation", help="Binary: rotate "
                                                  "(seeded, random) before taking bits. Default: on.",
                                                  show_default=False)] = None,
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
    def body():
        options = BuildOptions(index_type=index_type, metric=metric, hnsw_m=hnsw_m, ef_construction=ef_construction,
                               locality_order=locality_order, nlist=nlist, pq_m=pq_m, train_size=train_size,
                               target_recall=target_recall, precision=precision, dimensions=dimensions,
                               binary_threshold=binary_threshold, binary_rotation=binary_rotation)
        typer.echo(build_index(vectors_dir, output, options, texts=texts, verify=verify).summary())

    run_cli(body)


@index_app.command("verify")
def index_verify(index_dir: Annotated[str, typer.Argument(help="An index folder.")]) -> None:
    """Check every file of an index against the SHA-256 in its index.json; a bad file is named (exit 2)."""
    def body():
        info = verify_index(index_dir)
        typer.echo(f"OK: {index_dir}: all {len(info['files'])} files match their sha256 ({info['type']}, "
                   f"{info['count']} vectors).")

    run_cli(body)


def _describe_bits(info: dict) -> str:
    """What a binary index's bits are taken of, as index info prints it (folders from before transforms: x > 0)."""
    threshold = info.get("binary_threshold", "zero")
    rotation = info.get("binary_rotation")
    text = "x" if threshold == "zero" else f"x - {threshold}"
    if rotation:
        text = f"({text}) @ R" if threshold != "zero" else "x @ R"
    return f"{text} > 0" + (f" (R: random rotation, seed {rotation['seed']})" if rotation else "")


@index_app.command("info")
def index_info(index_dir: Annotated[str, typer.Argument(help="An index folder.")],
               as_json: Annotated[bool, typer.Option("--json", help="Print index.json.")] = False) -> None:
    """What an index holds: type, size, model, search settings and their measured recall."""
    def body():
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
            "bits": _describe_bits(info) if info.get("precision") in ("binary", "ubinary") else None,
            "model": f"{info['model']['spec']} (fingerprint {info['model']['fingerprint']})",
            "search": ", ".join(f"{k}={v}" for k, v in info["search"].items()) or "exact",
            "recall@10": (f"{cal['rescore_recall_at_10']:.3f} rescored {info['rescore_multiplier']} x k on "
                          if "rescore_recall_at_10" in cal else f"{cal['recall_at_10']:.3f} on ")
                         + f"{cal['probes']} corpus probes",
            "texts": "yes" if info["texts"] else f"no ({info.get('texts_note')})",
        }
        for key, value in rows.items():
            if value is not None:
                typer.echo(f"{key:<10} {value}")

    run_cli(body)


def search(
    index_dir: Annotated[str, typer.Argument(help="An index folder from `embedkit index build`.")],
    queries: Annotated[list[str], typer.Argument(help="Query text(s).")],
    k: Annotated[int, typer.Option("-k", "--k", help="Results per query.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ef_search: Annotated[int, typer.Option(help="HNSW search depth (default: calibrated).")] = None,
    nprobe: Annotated[int, typer.Option(help="IVF lists to visit (default: calibrated).")] = None,
    k_factor: Annotated[int, typer.Option(help="IVF-PQ exact re-ranking depth (default: calibrated).")] = None,
    rescore_multiplier: Annotated[int, typer.Option(help="Compact indexes: rescore this many times k candidates "
                                                    "with the float vectors (default: the index's: calibrated at "
                                                    "build for binary, off for others; 0 = off).")] = None,
    model: Annotated[str, typer.Option(help="Query model (default: the one that encoded the corpus).")] = None,
    check_model: Annotated[bool, typer.Option("--check-model/--no-check-model", help="Refuse a --model "
                                              "whose fingerprint differs from the index's.")] = True,
    verify: Annotated[bool, typer.Option("--verify", help="Hash every byte of the index files first (default: "
                                         "sizes and sampled blocks).")] = False,
) -> None:
    """Search an index with text queries, encoded as queries by the index's own model."""
    def body():
        embedder = None
        if model is not None:
            embedder = open_embedder(model)
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

    run_cli(body)
