"""Benchmark for `embedkit encode` and `embedkit index` (issue 4 targets); results go to
bench/results/encode_index.json (raw) and bench/results/encode_index.md (tables).

    python bench/bench_encode_index.py encode      # encode_corpus vs in-memory Embedder.encode, 1x vs 4x corpus
    python bench/bench_encode_index.py synthetic --kind random      # 1M x 256 normalised random vectors
    python bench/bench_encode_index.py synthetic --kind clustered   # 1M x 256 clustered vectors
    python bench/bench_encode_index.py msmarco     # real smollm2-135m vectors of MSMARCO-5k: index types + nDCG
    python bench/bench_encode_index.py report      # rewrite the markdown from the JSON

Each part stores its figures under its own key, so parts can run separately (the machine is shared: run them
one at a time). Recall@10 is against exact search on held-out queries; queries/s is one batch of queries on all
FAISS threads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from embedkit.io import atomic_write_json, atomic_write_text  # noqa: E402

RESULTS = REPO / "bench" / "results" / "encode_index.json"
REPORT = REPO / "bench" / "results" / "encode_index.md"
MSMARCO = REPO.parent / "shared" / "data" / "retrieval" / "MSMARCO-5k"
MODEL = "smollm2-135m"


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def save(key: str, value) -> None:
    results = load_results()
    results[key] = value
    atomic_write_json(RESULTS, results)
    write_report(results)
    print(json.dumps(value, indent=2))


def machine() -> dict:
    import faiss  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from embedkit.hardware import describe_cpu  # noqa: PLC0415

    return {**describe_cpu(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "faiss_threads": faiss.omp_get_max_threads(), "load_average_at_start": os.getloadavg()[0],
            "faiss": faiss.__version__}


# -- 1. encode throughput -----------------------------------------------------------------------------------
def bench_encode(args) -> None:
    from embedkit import Embedder  # noqa: PLC0415
    from embedkit.corpus import encode_corpus  # noqa: PLC0415
    from embedkit.datasets import read_jsonl  # noqa: PLC0415

    embedder = Embedder.from_pretrained(args.model, dtype=args.dtype, max_length=args.max_length)
    rows = list(read_jsonl(MSMARCO / "corpus.jsonl"))
    out: dict = {"model": args.model, "max_length": args.max_length, "dtype": str(embedder.backbone.dtype),
                 "machine": machine(), "runs": []}
    work = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    try:
        for n in (args.n, 4 * args.n):
            subset = rows[:n]
            corpus = work / f"corpus-{n}.jsonl"
            corpus.write_text("".join(json.dumps(r) + "\n" for r in subset), encoding="utf-8")
            texts = [(r["title"] + " " + r["text"]) if r["title"] else r["text"] for r in subset]
            memory, files, inside = [], [], []
            real_encode = embedder.encode

            def timed_encode(*a, _real=real_encode, _inside=inside, **k):  # time in the model (load-robust)
                began = time.perf_counter()
                try:
                    return _real(*a, **k)
                finally:
                    _inside[-1] += time.perf_counter() - began

            for repeat in range(args.repeats):  # interleaved, so load changes hit both alike
                began = time.perf_counter()
                embedder.encode(texts, show_progress_bar=False)
                memory.append(time.perf_counter() - began)
                target = work / f"vectors-{n}-{repeat}"
                inside.append(0.0)
                embedder.encode = timed_encode
                began = time.perf_counter()
                encode_corpus(embedder, [corpus], target, model_spec=args.model, rank=0, world_size=1)
                files.append(time.perf_counter() - began)
                embedder.encode = real_encode
                shutil.rmtree(target)
            run = {"texts": n, "in_memory_s": [round(t, 2) for t in memory],
                   "encode_corpus_s": [round(t, 2) for t in files],
                   "in_memory_texts_per_s": round(n / min(memory), 2),
                   "encode_corpus_texts_per_s": round(n / min(files), 2),
                   "overhead_pct": round(100 * (min(files) / min(memory) - 1), 1),
                   "file_handling_s": [round(f - i, 2) for f, i in zip(files, inside, strict=True)],
                   "file_handling_pct_in_run": round(100 * min((f - i) / f for f, i in zip(files, inside,
                                                                                       strict=True)), 1)}
            out["runs"].append(run)
            print(run, flush=True)
        small, large = out["runs"]
        out["scaling_4x_time_ratio"] = round(min(large["encode_corpus_s"]) / min(small["encode_corpus_s"]), 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save("encode", out)


# -- 2. index types on synthetic vectors ---------------------------------------------------------------------
def synthetic(kind: str, n: int, d: int, seed: int) -> np.ndarray:
    """Normalised float32 rows: isotropic random, or around 2,000 random centres (cosine to centre ~0.6)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    centres = np.random.default_rng(12345).standard_normal((2000, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        noise = rng.standard_normal((m, d), dtype=np.float32)
        if kind == "random":
            block = noise
        else:
            block = centres[rng.integers(0, len(centres), m)] + (1.3 / np.sqrt(d)) * noise
        out[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def timed_search(index, queries: np.ndarray, k: int, params) -> tuple[np.ndarray, float]:
    began = time.perf_counter()
    _, labels = index.search(queries, k, params=params)
    return labels, len(queries) / (time.perf_counter() - began)


def measure_types(vectors: np.ndarray, queries: np.ndarray, types: list[str], metric: str = "ip",
                  sweep: bool = True) -> dict:
    """Per index type: build seconds, calibrated settings, held-out recall@10 vs exact, queries/s (+ a sweep)."""
    import faiss  # noqa: PLC0415

    from embedkit.index import BuildOptions, build_faiss, get_index_type, recall  # noqa: PLC0415

    out = {}
    truth = None
    for kind in types:
        index, info = build_faiss(vectors, BuildOptions(index_type=kind), metric)
        if kind == "flat":
            truth, qps = timed_search(index, queries, 10, None)
            out[kind] = {"factory": info["factory"], "build_s": info["seconds"]["total"], "recall_at_10": 1.0,
                         "qps": round(qps, 1)}
            print(kind, out[kind], flush=True)
            exact = index  # kept: re-timed beside each other type, so a load change can't skew the ratio
            continue
        assert truth is not None, "flat first: it gives the exact answers"
        kind_entry = get_index_type(info["type"])
        labels, qps = timed_search(index, queries, 10, kind_entry.faiss_params(index, info["search"]))
        row = {"factory": info["factory"], "build_s": info["seconds"]["total"], "settings": info["search"],
               "probe_recall_at_10": info["calibration"]["recall_at_10"],
               "recall_at_10": round(recall(labels, truth), 4), "qps": round(qps, 1)}
        row["exact_qps_adjacent"] = round(timed_search(exact, queries, 10, None)[1], 1)
        row["speedup_vs_exact"] = round(row["qps"] / row["exact_qps_adjacent"], 1)
        if sweep:
            row["sweep"] = []
            name = kind_entry.knobs[0].name
            base = info["search"][name]
            values = {max(1, base // 4), max(1, base // 2), base, base * 2, base * 4}
            if name == "efSearch":  # the steps around recall 0.95 too, where the speed goal is judged
                values |= {32, 48, 64, 80, 96, 128}
            for value in sorted(values):
                settings = {**info["search"], name: value}
                if name == "nprobe":
                    settings[name] = min(value, faiss.try_extract_index_ivf(index).nlist)
                labels, qps = timed_search(index, queries, 10, kind_entry.faiss_params(index, settings))
                exact_qps = timed_search(exact, queries, 10, None)[1]  # re-timed beside each point
                row["sweep"].append({**settings, "recall_at_10": round(recall(labels, truth), 4),
                                     "qps": round(qps, 1), "x_exact": round(qps / exact_qps, 1)})
        out[kind] = row
        print(kind, row, flush=True)
        del index
    out["flat"]["speedup_vs_exact"] = 1.0
    return out


def bench_synthetic(args) -> None:
    vectors = synthetic(args.kind, args.n, args.d, seed=0)
    queries = synthetic(args.kind, args.queries, args.d, seed=1)
    result = {"kind": args.kind, "n": args.n, "d": args.d, "queries": args.queries, "machine": machine(),
              "types": measure_types(vectors, queries, args.types.split(","))}
    save(f"synthetic_{args.kind}_{args.n}x{args.d}", result)


# -- 3. real vectors: MSMARCO-5k with smollm2-135m (causal, mean) ------------------------------------------
def bench_msmarco(args) -> None:
    from embedkit import Embedder  # noqa: PLC0415
    from embedkit.corpus import open_vectors  # noqa: PLC0415
    from embedkit.datasets import read_jsonl  # noqa: PLC0415
    from embedkit.evaluation.retrieval import evaluate_retrieval  # noqa: PLC0415

    work = Path(args.work)
    embedder = Embedder.from_pretrained(MODEL, dtype=args.dtype, attention="causal", pooling="mean",
                                        max_length=args.max_length)
    began = time.perf_counter()
    retrieval = {}
    for kind in ("flat", "hnsw", "ivf", "ivfpq"):  # the vectors are encoded once (work dir), then reused
        scores = evaluate_retrieval(embedder, MSMARCO, index_type=kind, work_dir=work)
        retrieval[kind] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items()}
        print(kind, retrieval[kind], flush=True)
    vectors = open_vectors(work / "vectors").load()
    queries = embedder.encode_queries([r["text"] for r in read_jsonl(MSMARCO / "queries.jsonl")])
    result = {"model": MODEL, "attention": "causal", "pooling": "mean", "max_length": args.max_length,
              "dtype": str(embedder.backbone.dtype),
              "machine": machine(), "seconds": round(time.perf_counter() - began, 1), "retrieval": retrieval,
              "index_types_real_queries": measure_types(vectors, queries, ["flat", "hnsw", "ivf", "ivfpq"],
                                                        sweep=False)}
    save("msmarco", result)


# -- report ------------------------------------------------------------------------------------------------------
def write_report(results: dict) -> None:
    lines = ["# Encode and index benchmark (issue 4)", "",
             "Written by `bench/bench_encode_index.py` from `encode_index.json`. Machine: 2 cores shared with "
             "other work (load average noted per part), faiss-cpu, float32.", ""]
    if "encode" in results:
        e = results["encode"]
        lines += ["## Encode throughput: `encode_corpus` (files, shards, checksums, manifest) vs in-memory "
                  "`Embedder.encode`", "",
                  f"{e['model']}, max_length {e['max_length']}, MSMARCO-5k passages; best of "
                  f"{len(e['runs'][0]['in_memory_s'])} interleaved runs; load average "
                  f"{e['machine']['load_average_at_start']:.1f}.",
                  "", "| texts | in memory (texts/s) | embedkit encode (texts/s) | overhead |", "|---|---|---|---|"]
        for r in e["runs"]:
            lines.append(f"| {r['texts']} | {r['in_memory_texts_per_s']} | {r['encode_corpus_texts_per_s']} | "
                         f"{r['overhead_pct']:+.1f}% |")
        lines += ["", "Run-to-run load swings on the shared machine make the between-run comparison noisy; the "
                  "load-robust figure is the time `encode_corpus` spends outside the model within the same run "
                  "(reading, checks, hashing, writing):", ""]
        for r in e["runs"]:
            if "file_handling_s" in r:
                lines.append(f"- {r['texts']} texts: file handling {r['file_handling_s']} s per run = "
                             f"{r['file_handling_pct_in_run']}% of the run.")
        lines += ["", f"4x corpus / 1x corpus time: **{e['scaling_4x_time_ratio']}** (linear = 4.0).", ""]
    for key in sorted(k for k in results if k.startswith("synthetic_")):
        s = results[key]
        lines += [f"## Index types on {s['n']:,} x {s['d']} {s['kind']} normalised vectors", "",
                  f"{s['queries']} held-out queries from the same distribution; recall@10 against exact search; "
                  f"load average {s['machine']['load_average_at_start']:.1f}.", ""]
        lines += _types_table(s["types"])
    if "partial_1m" in results:
        p = results["partial_1m"]
        lines += ["## 1,000,000 x 256 (partial)", "", p["note"], "",
                  f"- clustered, exact (Flat): {p['clustered_flat']['qps']} queries/s",
                  f"- random, exact (Flat): {p['random_flat']['qps']} queries/s", ""]
    if "msmarco_stories260k_index_types" in results:
        m = results["msmarco_stories260k_index_types"]
        lines += [f"## Index types on real vectors: MSMARCO-5k encoded by {m['model']} ({m['n']:,} x {m['d']}), "
                  f"its {m['queries']} real queries", ""]
        lines += _types_table(m["types"])
    if "msmarco" in results:
        m = results["msmarco"]
        lines += [f"## MSMARCO-5k with {m['model']} ({m['attention']}, {m['pooling']} pooling, max_length "
                  f"{m['max_length']})", "", "| index | nDCG@10 | recall@100 |", "|---|---|---|"]
        for kind, r in m["retrieval"].items():
            lines.append(f"| {kind} | {r['ndcg_at_10']:.4f} | {r['recall_at_100']:.4f} |")
        lines += ["", "Index types on the real vectors (5,000 passages, the 43 real queries):", ""]
        lines += _types_table(m["index_types_real_queries"])
    atomic_write_text(REPORT, "\n".join(lines) + "\n")


def _types_table(types: dict) -> list[str]:
    lines = ["| type | factory | build s | search settings | recall@10 (probes) | recall@10 (queries) | queries/s "
             "| x exact |", "|---|---|---|---|---|---|---|---|"]
    for kind, r in types.items():
        settings = ", ".join(f"{k}={v}" for k, v in r.get("settings", {}).items()) or "exact"
        lines.append(f"| {kind} | {r['factory']} | {r['build_s']} | {settings} | {r.get('probe_recall_at_10', 1.0)} "
                     f"| {r['recall_at_10']} | {r['qps']} | {r['speedup_vs_exact']} |")
    sweeps = [(k, r["sweep"]) for k, r in types.items() if r.get("sweep")]
    for kind, sweep in sweeps:
        lines += ["", f"{kind} sweep: " + "; ".join(
            ", ".join(f"{k}={v}" for k, v in p.items() if k not in ("recall_at_10", "qps", "x_exact"))
            + f" -> recall {p['recall_at_10']}, {p['qps']} q/s"
            + (f" ({p['x_exact']}x exact)" if "x_exact" in p else "") for p in sweep)]
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("encode")
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--dtype", default="auto", help="auto = bfloat16 on AMX / AVX512-BF16 CPUs (this machine)")
    p.add_argument("--model", default=MODEL, help="model spec (a small one makes file handling relatively "
                   "larger: a stricter test of its overhead)")
    p = sub.add_parser("synthetic")
    p.add_argument("--kind", choices=["random", "clustered"], default="random")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--types", default="flat,hnsw,ivf,ivfpq")
    p = sub.add_parser("msmarco")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "embedkit-bench-msmarco"))
    sub.add_parser("report")
    args = parser.parse_args()
    {"encode": bench_encode, "synthetic": bench_synthetic, "msmarco": bench_msmarco,
     "report": lambda a: write_report(load_results())}[args.part](args)


if __name__ == "__main__":
    main()
