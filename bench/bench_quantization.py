"""Retrieval quality vs memory of compact indexes (issue 14 item 3): float32 / int8 / binary / binary + rescore.

    python bench/bench_quantization.py msmarco      # MSMARCO-5k encoded by SmolLM2-135M (real vectors, real qrels)
    python bench/bench_quantization.py msmarco --model ../shared/models/stories260K   # a tiny model, a smoke run
    python bench/bench_quantization.py synthetic    # 200k x 256 clustered vectors (bench_encode_index.py's set)
    python bench/bench_quantization.py report       # rewrite the markdown from the JSON

Recall@10 is against exact float32 search; nDCG@10 against the qrels (MSMARCO only); bytes per vector is the index
file's size over its rows (the float32 vectors folder kept for rescoring is on disk, memory-mapped, and only the
candidates' rows are read); queries/s is one batch of all queries, rescoring included. Results:
bench/results/quantization.json and .md. Each part runs in well under 3 minutes on 2 shared cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from embedkit.io import atomic_write_json, atomic_write_text  # noqa: E402

RESULTS = REPO / "bench" / "results" / "quantization.json"
REPORT = REPO / "bench" / "results" / "quantization.md"
MSMARCO = REPO.parent / "shared" / "data" / "retrieval" / "MSMARCO-5k"
VARIANTS = (("float32", "float32", 0), ("int8", "int8", 0), ("int8 + rescore 4x", "int8", 4),
            ("binary", "binary", 0), ("binary + rescore 4x", "binary", 4), ("binary + rescore 10x", "binary", 10),
            ("binary + rescore 20x", "binary", 20))


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)]))


def measure(index, queries: np.ndarray, truth: np.ndarray, multiplier: int) -> tuple[dict, np.ndarray]:
    index.search_vectors(queries[:4], 10, rescore_multiplier=multiplier)  # warm (mmap, rescoring folder)
    began = time.perf_counter()
    _, found = index.search_vectors(queries, 10, rescore_multiplier=multiplier)
    seconds = time.perf_counter() - began
    return {"recall_at_10": round(recall_at(found, truth), 4), "qps": round(len(queries) / seconds, 1),
            "bytes_per_vector": index.info["bytes_per_vector"], "type": index.index_type}, found


def run_variants(vectors_dir: Path, work: Path, queries: np.ndarray, extra=None) -> dict:
    """Build one index per precision from the vectors folder and search it with each rescoring depth."""
    from embedkit.index import BuildOptions, Index, build_index  # noqa: PLC0415

    indexes, out, truth = {}, {}, None
    for label, precision, multiplier in VARIANTS:
        if precision not in indexes:
            began = time.perf_counter()
            built = build_index(vectors_dir, work / precision, BuildOptions(precision=precision,
                                                                            index_type="flat" if precision == "float32"
                                                                            else "auto"), texts=False)
            indexes[precision] = (Index.load(built.output), round(time.perf_counter() - began, 1))
        index, build_seconds = indexes[precision]
        if truth is None:
            _, truth = index.search_vectors(queries, 10, rescore_multiplier=0)
        out[label], found = measure(index, queries, truth, multiplier)
        out[label]["build_seconds"] = build_seconds
        if extra is not None:
            out[label].update(extra(index, found))
    return out


def write_vectors(folder: Path, vectors: np.ndarray) -> None:
    """A vectors folder from an array (synthetic data has no model): one shard, the manifest encode writes."""
    from embedkit.corpus.manifest import FORMAT, FORMAT_VERSION, shard_paths  # noqa: PLC0415
    from embedkit.io import atomic_save_npy, sha256_file  # noqa: PLC0415

    vec, ids, meta = shard_paths(folder, 0)
    vec.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(vec, vectors)
    atomic_write_text(ids, json.dumps([f"v{i}" for i in range(len(vectors))]))
    shard = {"shard": 0, "rows": [0, len(vectors)], "count": len(vectors), "vectors": vec.name, "ids": ids.name,
             "shape": list(vectors.shape), "dtype": "float32",
             "bytes": {"vectors": vec.stat().st_size, "ids": ids.stat().st_size},
             "sha256": {"vectors": sha256_file(vec), "ids": sha256_file(ids)}}
    atomic_write_json(meta, {**shard, "job": "synthetic", "skipped_empty": 0, "skipped_ids": []})
    atomic_write_json(folder / "manifest.json", {
        "format": FORMAT, "version": FORMAT_VERSION, "job": "synthetic", "finished": "now",
        "model": {"spec": "synthetic", "fingerprint": "synthetic", "config": {}}, "dimension": vectors.shape[1],
        "dtype": "float32", "precision": "float32", "normalized": True, "metric": "ip", "count": len(vectors),
        "skipped_empty": 0, "inputs": [], "reader": {}, "options": {}, "shards": [shard]})


def synthetic(n: int, d: int) -> dict:
    from bench_encode_index import synthetic as clustered  # noqa: PLC0415

    rows = clustered("clustered", n + 1000, d, seed=7)
    with tempfile.TemporaryDirectory(dir=REPO / "bench" / "results") as tmp:
        write_vectors(Path(tmp) / "vectors", rows[:n])
        variants = run_variants(Path(tmp) / "vectors", Path(tmp), rows[n:])
    return {"n": n, "d": d, "queries": 1000, "variants": variants}


def msmarco(model: str, max_length: int) -> dict:
    from embedkit.corpus import encode_corpus  # noqa: PLC0415
    from embedkit.embedder import open_model  # noqa: PLC0415
    from embedkit.evaluation.retrieval import read_qrels, score_run  # noqa: PLC0415

    embedder = open_model(model, max_length=max_length)  # causal mean, dtype auto
    qrels = read_qrels(MSMARCO / "qrels" / "test.tsv")
    queries = [json.loads(line) for line in (MSMARCO / "queries.jsonl").read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory(dir=REPO / "bench" / "results") as tmp:
        began = time.perf_counter()
        encode_corpus(embedder, [MSMARCO / "corpus.jsonl"], Path(tmp) / "vectors", model_spec=model)
        encode_seconds = round(time.perf_counter() - began, 1)
        vectors = embedder.encode([q["text"] for q in queries], instruction=embedder.config.query_instruction)

        def ndcg(index, found):
            run = {q["_id"]: [index.id_at(int(p)) for p in row if p >= 0] for q, row in zip(queries, found,
                                                                                              strict=True)}
            return {"ndcg_at_10": round(score_run(run, qrels, (10,))["ndcg_at_10"], 4)}

        variants = run_variants(Path(tmp) / "vectors", Path(tmp), vectors, extra=ndcg)
    return {"model": Path(model).name, "dtype": str(embedder.backbone.dtype).removeprefix("torch."),
            "max_length": max_length, "n": 5000, "d": embedder.dimension,
            "queries": len(queries), "encode_seconds": encode_seconds, "variants": variants}


def write_report(results: dict) -> None:
    from embedkit.hardware import describe_cpu  # noqa: PLC0415

    lines = ["# Compact indexes: quality vs memory", "", f"CPU: {results.get('cpu', describe_cpu())['cpu']}", ""]
    for key, r in results.items():
        if key == "cpu":
            continue
        title = f"MSMARCO-5k, {r['model']} vectors" if key.startswith("msmarco") else "clustered synthetic set"
        lines += [f"## {title} ({r['n']:,} x {r['d']}, {r['queries']} queries)", "",
                  "| index | type | recall@10 vs exact | nDCG@10 | bytes/vector | memory vs float32 | queries/s |",
                  "|---|---|---|---|---|---|---|"]
        base = r["variants"]["float32"]["bytes_per_vector"]
        for label, v in r["variants"].items():
            lines.append(f"| {label} | {v['type']} | {v['recall_at_10']:.3f} | {v.get('ndcg_at_10', '-')} | "
                         f"{v['bytes_per_vector']} | {base / v['bytes_per_vector']:.1f}x less | {v['qps']:,} |")
        lines.append("")
    atomic_write_text(REPORT, "\n".join(lines))


def save(key: str, value: dict) -> None:
    from embedkit.hardware import describe_cpu  # noqa: PLC0415

    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[key] = value
    results["cpu"] = describe_cpu()
    atomic_write_json(RESULTS, results)
    write_report(results)
    print(REPORT.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["msmarco", "synthetic", "report"])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--model", default="smollm2-135m", help="msmarco: the encoder (causal mean, dtype auto)")
    args = p.parse_args()
    if args.part == "synthetic":
        save("synthetic", synthetic(args.n, args.d))
    elif args.part == "msmarco":
        result = msmarco(args.model, args.max_length)
        save(f"msmarco-{result['model']}", result)
    else:
        write_report(json.loads(RESULTS.read_text()))


if __name__ == "__main__":
    main()
