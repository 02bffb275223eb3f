"""Retrieval quality vs memory of compact indexes (issue 14 item 3): float32 / int8 / binary (each bit transform) at
each rescoring depth.

    python bench/bench_quantization.py encode --setup mean --cache /tmp/ek-binary   # encode MSMARCO-5k once, keep it
    python bench/bench_quantization.py msmarco --setup mean --cache /tmp/ek-binary  # SmolLM2-135M causal mean
    python bench/bench_quantization.py msmarco --setup prompteol --cache /tmp/ek-binary  # causal, last token, PromptEOL
    python bench/bench_quantization.py msmarco --model ../shared/models/stories260K   # a tiny model, a smoke run
    python bench/bench_quantization.py synthetic    # 200k x 256 clustered vectors (bench_encode_index.py's set)
    python bench/bench_quantization.py synthetic --n 1000000 --depths 0 4 10 20 50 100   # the issue's 1M x 256 set
    python bench/bench_quantization.py report       # rewrite the markdown from the JSON

Binary bits are sentence-transformers' of ``(x - t) @ R`` (``embedkit/index/compact.py``): ``t`` zero, the corpus mean
or median per dimension; ``R`` a seeded random rotation or none. Recall@10 is against exact float32 search over the
same vectors; MSMARCO adds nDCG@10 against the qrels (43 queries: noisy) and recall@10 over 600 corpus passages used
as queries (leave-one-out: their own row left out of both lists; less noisy, but documents, not queries). Bytes per
vector is the index file over its rows; a rotation adds d x d float32 in RAM (not per vector). The float32 vectors
folder kept for rescoring stays on disk, memory-mapped (only the candidates' rows are read). ``--qps`` times each
search (one batch of all queries, rescoring included, repeated for 0.5 s): run it under the exclusive CPU lock, or
leave it off.
Results: bench/results/quantization.json and .md.
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

from embedkit.corpus.manifest import write_vectors_folder  # noqa: E402
from embedkit.io import atomic_write_json, atomic_write_text  # noqa: E402

RESULTS = REPO / "bench" / "results" / "quantization.json"
REPORT = REPO / "bench" / "results" / "quantization.md"
MSMARCO = REPO.parent / "shared" / "data" / "retrieval" / "MSMARCO-5k"
BASELINES = (("float32", "float32", 0), ("int8", "int8", 0), ("int8 + rescore 4x", "int8", 4))
TRANSFORMS = (("zero (x > 0)", "zero", False), ("mean", "mean", False), ("median", "median", False),
              ("rotation", "zero", True), ("mean + rotation (default)", "mean", True))
DEPTHS = (0, 4, 10, 20)
PROBES = 600


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)]))


def without_self(labels: np.ndarray, own: np.ndarray) -> np.ndarray:
    """Each row's first 10 labels other than the probe's own position."""
    return np.array([[p for p in row if p != o][:10] for row, o in zip(labels.tolist(), own.tolist(), strict=True)])


class Probes:
    """Corpus rows used as queries, leave-one-out: (positions, vectors, exact top-10 without themselves)."""

    def __init__(self, vectors_dir: Path, float_index, count: int = PROBES):
        from embedkit.corpus import open_vectors  # noqa: PLC0415

        rows = open_vectors(vectors_dir, verify=False).load()
        self.own = np.sort(np.random.RandomState(1).choice(len(rows), size=min(count, len(rows)), replace=False))
        self.vectors = np.ascontiguousarray(rows[self.own], dtype=np.float32)
        self.truth = without_self(float_index.search_vectors(self.vectors, 11, rescore_multiplier=0)[1], self.own)

    def recall(self, index, multiplier: int) -> float:
        found = index.search_vectors(self.vectors, 11, rescore_multiplier=multiplier)[1]
        return round(recall_at(without_self(found, self.own), self.truth), 4)


def measure(index, queries: np.ndarray, truth: np.ndarray, multiplier: int, qps: bool, extra, probes) -> dict:
    """Recall@10 (and nDCG, probe recall) of one index at one rescoring depth; queries/s when ``qps``."""
    _, found = index.search_vectors(queries, 10, rescore_multiplier=multiplier)  # also warms (mmap, rescoring)
    out = {"recall_at_10": round(recall_at(found, truth), 4)}
    if qps:  # the batch again until 0.5 s have passed: one 43-query batch takes well under a millisecond
        began, batches = time.perf_counter(), 0
        while (seconds := time.perf_counter() - began) < 0.5:
            index.search_vectors(queries, 10, rescore_multiplier=multiplier)
            batches += 1
        out["qps"] = round(batches * len(queries) / seconds, 1)
    if extra is not None:
        out.update(extra(index, found))
    if probes is not None:
        out["probe_recall_at_10"] = probes.recall(index, multiplier)
    return out


def build(vectors_dir: Path, folder: Path, **options) -> tuple[object, dict]:
    from embedkit.index import BuildOptions, Index, build_index  # noqa: PLC0415

    began = time.perf_counter()
    built = build_index(vectors_dir, folder, BuildOptions(**options), texts=False)
    index = Index.load(built.output)
    rotation = index.info.get("binary_rotation")
    return index, {"type": index.index_type, "bytes_per_vector": index.info["bytes_per_vector"],
                   "rotation_bytes": index.dimension ** 2 * 4 if rotation else 0,
                   "rescore_multiplier": index.info.get("rescore_multiplier", 0),  # calibrated at build (binary)
                   "build_seconds": round(time.perf_counter() - began, 1)}


def run_variants(vectors_dir: Path, work: Path, queries: np.ndarray, qps: bool, extra=None,
                 probe: bool = False, depths: tuple[int, ...] = DEPTHS) -> dict:
    """float32 (the truth) and int8 baselines, then one binary index per bit transform at each rescoring depth."""
    float_index, _ = build(vectors_dir, work / "float32", index_type="flat")
    _, truth = float_index.search_vectors(queries, 10, rescore_multiplier=0)
    probes = Probes(vectors_dir, float_index) if probe else None
    baselines, binary = {}, {}
    for label, precision, multiplier in BASELINES:
        index, facts = (float_index, build(vectors_dir, work / "float32", index_type="flat")[1]) \
            if precision == "float32" else build(vectors_dir, work / precision, precision=precision)
        baselines[label] = {**facts, **measure(index, queries, truth, multiplier, qps, extra, probes)}
    for label, threshold, rotation in TRANSFORMS:
        index, facts = build(vectors_dir, work / f"binary-{threshold}-{rotation}", precision="binary",
                             binary_threshold=threshold, binary_rotation=rotation)
        binary[label] = {**facts, "depths": {str(m): measure(index, queries, truth, m, qps, extra, probes)
                                             for m in depths}}
        calibrated = facts["rescore_multiplier"]  # what a search gets by default: the depth build calibrated
        binary[label]["calibrated"] = binary[label]["depths"].get(str(calibrated)) or measure(
            index, queries, truth, calibrated, qps, extra, probes)
    return {"baselines": baselines, "binary": binary}


def synthetic(n: int, d: int, qps: bool, depths: tuple[int, ...] = DEPTHS) -> dict:
    from bench_encode_index import synthetic as clustered  # noqa: PLC0415

    rows = clustered("clustered", n + 1000, d, seed=7)
    with tempfile.TemporaryDirectory(dir=REPO / "bench" / "results") as tmp:
        write_vectors_folder(Path(tmp) / "vectors", rows[:n])
        variants = run_variants(Path(tmp) / "vectors", Path(tmp), rows[n:], qps, depths=depths)
    return {"n": n, "d": d, "queries": 1000, "variants": variants}


SETUPS = {  # how MSMARCO is encoded: the untrained causal mean, and PromptEOL (what users index without training)
    "mean": {"attention": "causal", "pooling": "mean"},
    "prompteol": {"attention": "causal", "pooling": "last", "template": 'This sentence : "{text}" means in one word:"'},
}


def encoded(model: str, setup: str, max_length: int, cache: Path | None, work: Path) -> tuple[Path, np.ndarray, dict]:
    """(vectors folder, query vectors, facts) of MSMARCO-5k encoded by ``model`` with ``setup``; under ``cache`` the
    vectors and queries are kept and reused (encoding SmolLM2 takes minutes; a finished folder is left alone)."""
    folder = (cache / f"{Path(model).name}-{setup}-{max_length}") if cache else work
    facts_file, queries_file = folder / "facts.json", folder / "queries.npy"
    if facts_file.is_file() and queries_file.is_file():
        return folder / "vectors", np.load(queries_file, allow_pickle=False), json.loads(facts_file.read_text())
    from embedkit.corpus import encode_corpus  # noqa: PLC0415
    from embedkit.embedder import open_model  # noqa: PLC0415

    embedder = open_model(model, max_length=max_length, **SETUPS[setup])  # dtype auto
    queries = [json.loads(line) for line in (MSMARCO / "queries.jsonl").read_text().splitlines() if line.strip()]
    began = time.perf_counter()
    encode_corpus(embedder, [MSMARCO / "corpus.jsonl"], folder / "vectors", model_spec=model)
    facts = {"model": Path(model).name, "setup": setup, **SETUPS[setup],
             "dtype": str(embedder.backbone.dtype).removeprefix("torch."), "max_length": max_length,
             "d": embedder.dimension, "encode_seconds": round(time.perf_counter() - began, 1)}
    vectors = embedder.encode([q["text"] for q in queries], instruction=embedder.config.query_instruction)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(queries_file, np.asarray(vectors, dtype=np.float32))
    atomic_write_json(facts_file, facts)
    return folder / "vectors", vectors, facts


def msmarco(model: str, setup: str, max_length: int, cache: Path | None, qps: bool) -> dict:
    from embedkit.evaluation.retrieval import read_qrels, score_run  # noqa: PLC0415

    qrels = read_qrels(MSMARCO / "qrels" / "test.tsv")
    queries = [json.loads(line) for line in (MSMARCO / "queries.jsonl").read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory(dir=REPO / "bench" / "results") as tmp:
        vectors_dir, vectors, facts = encoded(model, setup, max_length, cache, Path(tmp) / "encoded")

        def ndcg(index, found):
            run = {q["_id"]: [index.id_at(int(p)) for p in row if p >= 0] for q, row in zip(queries, found,
                                                                                              strict=True)}
            return {"ndcg_at_10": round(score_run(run, qrels, (10,))["ndcg_at_10"], 4)}

        variants = run_variants(vectors_dir, Path(tmp), vectors, qps, extra=ndcg, probe=True)
    return {**facts, "n": 5000, "queries": len(queries), "variants": variants}


def _title(key: str, r: dict) -> str:
    if not key.startswith("msmarco"):
        return f"clustered synthetic set ({r['n']:,} x {r['d']}, {r['queries']} queries)"
    setup = {"mean": "causal, mean pooling", "prompteol": "causal, last token, PromptEOL template"}[r.get("setup",
                                                                                                      "mean")]
    return (f"MSMARCO-5k, {r['model']} vectors, {setup} ({r['n']:,} x {r['d']}, {r.get('dtype')}, max_length "
            f"{r.get('max_length')}; {r['queries']} queries, {PROBES} passage probes)")


def _cell(v: dict, key: str, fmt: str = "{:.3f}") -> str:
    return fmt.format(v[key]) if key in v else "-"


def write_report(results: dict) -> None:
    """Per set: the float32/int8 baselines, then recall@10 (nDCG@10, probe recall, queries/s when measured) of every
    binary transform at every rescoring depth."""
    from embedkit.hardware import describe_cpu  # noqa: PLC0415

    lines = ["# Compact indexes: quality vs memory", "", f"CPU: {results.get('cpu', describe_cpu())['cpu']}", ""]
    for key, r in results.items():
        if key == "cpu" or "baselines" not in r.get("variants", {}):
            continue
        variants = r["variants"]
        base = variants["baselines"]["float32"]["bytes_per_vector"]
        lines += [f"## {_title(key, r)}", "", "| index | type | recall@10 vs exact | probe recall@10 | nDCG@10 | "
                  "bytes/vector | memory vs float32 | queries/s |", "|---|---|---|---|---|---|---|---|"]
        for label, v in variants["baselines"].items():
            lines.append(f"| {label} | {v['type']} | {v['recall_at_10']:.3f} | {_cell(v, 'probe_recall_at_10')} | "
                         f"{_cell(v, 'ndcg_at_10', '{:.4f}')} | {v['bytes_per_vector']} | "
                         f"{base / v['bytes_per_vector']:.1f}x less | {_cell(v, 'qps', '{:,}')} |")
        depths = sorted(map(int, next(iter(variants["binary"].values()))["depths"]))  # as measured
        head = " | ".join(f"{m}x" if m else "none" for m in depths)
        timed = any("qps" in d for v in variants["binary"].values() for d in v["depths"].values())
        lines += ["", f"Binary ({next(iter(variants['binary'].values()))['type']}, "
                  f"{next(iter(variants['binary'].values()))['bytes_per_vector']} bytes per vector, "
                  f"{base / next(iter(variants['binary'].values()))['bytes_per_vector']:.1f}x less than float32), "
                  "by bit transform and rescoring depth:", "",
                  f"| bits of | recall@10 vs exact: {head} | probe recall@10: {head} | nDCG@10: {head} | "
                  "rotation RAM | calibrated depth: recall@10 |" + (f" queries/s: {head} |" if timed else ""),
                  "|---|" + "---|" * ((4 if timed else 3) * len(depths) + 2)]
        for label, v in variants["binary"].items():
            cells = [" | ".join(_cell(v["depths"][str(m)], key, fmt) for m in depths)
                     for key, fmt in (("recall_at_10", "{:.3f}"), ("probe_recall_at_10", "{:.3f}"),
                                      ("ndcg_at_10", "{:.4f}"))]
            ram = f"{v['rotation_bytes'] / 2**20:.2f} MB" if v["rotation_bytes"] else "-"
            timing = " | ".join(_cell(v["depths"][str(m)], "qps", "{:,}") for m in depths)
            calibrated = (f"{v['rescore_multiplier']}x: {v['calibrated']['recall_at_10']:.3f}"
                          if "calibrated" in v else "-")
            lines.append(f"| {label} | {' | '.join(cells)} | {ram} | {calibrated} |"
                         + (f" {timing} |" if timed else ""))
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
    p.add_argument("part", choices=["msmarco", "synthetic", "encode", "report"])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--model", default="smollm2-135m", help="msmarco: the encoder (dtype auto)")
    p.add_argument("--setup", choices=list(SETUPS), default="mean", help="msmarco: causal mean, or PromptEOL")
    p.add_argument("--cache", type=Path, help="msmarco: keep the encoded vectors and queries here, reuse them")
    p.add_argument("--qps", action="store_true", help="time the searches (run under the exclusive CPU lock)")
    p.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS), help="synthetic: binary rescoring depths")
    args = p.parse_args()
    if args.part == "synthetic":
        key = "synthetic" if (args.n, args.d) == (200_000, 256) else f"synthetic-{args.n}x{args.d}"  # keep both
        save(key, synthetic(args.n, args.d, args.qps, tuple(args.depths)))
    elif args.part == "encode":  # fill the cache only
        with tempfile.TemporaryDirectory(dir=REPO / "bench" / "results") as tmp:
            print(encoded(args.model, args.setup, args.max_length, args.cache, Path(tmp))[2])
    elif args.part == "msmarco":
        result = msmarco(args.model, args.setup, args.max_length, args.cache, args.qps)
        save(f"msmarco-{result['model']}" + ("" if args.setup == "mean" else f"-{args.setup}"), result)
    else:
        write_report(json.loads(RESULTS.read_text()))


if __name__ == "__main__":
    main()
