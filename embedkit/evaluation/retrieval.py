"""Retrieval evaluation over a BEIR-layout folder, through the real pipeline: encode the corpus to a vectors
folder, build the index, search every query, score nDCG@k and recall@k against the qrels.

Metrics follow trec_eval / pytrec_eval as BEIR and MTEB report them: nDCG with linear gains (the graded
qrels score) and log2 discount, ideal ranking from the qrels; recall counts documents with score > 0.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from embedkit.corpus.encode import encode_corpus
from embedkit.datasets import read_jsonl
from embedkit.index import BuildOptions, Index, build_index
from embedkit.io import atomic_write_text


def read_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """query id -> {doc id: relevance} from a BEIR qrels TSV (header ``query-id corpus-id score``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: a BEIR task folder has qrels/<split>.tsv.")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["query-id", "corpus-id", "score"]:
            raise ValueError(f"{path}:1: expected the header 'query-id<TAB>corpus-id<TAB>score', got {header}.")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < 3:
                raise ValueError(f"{path}:{line}: expected 3 tab-separated columns, got {len(row)}.")
            try:
                qrels.setdefault(row[0], {})[row[1]] = int(row[2])
            except ValueError:
                raise ValueError(f"{path}:{line}: score {row[2]!r} is not an integer.") from None
    return qrels


def ndcg_at_k(ranked: Sequence[str], relevance: Mapping[str, int], k: int) -> float:
    """nDCG@k with linear gains: sum rel_i / log2(i + 1) over the top k, divided by the ideal."""
    dcg = sum(relevance.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(ranked[:k]))
    ideal = sorted((r for r in relevance.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(rank + 2) for rank, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: Sequence[str], relevance: Mapping[str, int], k: int) -> float:
    """Share of the relevant documents (score > 0) found in the top k."""
    relevant = {doc for doc, r in relevance.items() if r > 0}
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def score_run(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]],
              k_values: Iterable[int] = (10, 100)) -> dict[str, float]:
    """Mean nDCG@k and recall@k over the queries that have a relevant document in the qrels."""
    scored = [q for q in run if any(r > 0 for r in qrels.get(q, {}).values())]
    if not scored:
        raise ValueError("No query of the run has a relevant document in the qrels: check the ids match.")
    out: dict[str, float] = {}
    for k in k_values:
        out[f"ndcg_at_{k}"] = sum(ndcg_at_k(run[q], qrels[q], k) for q in scored) / len(scored)
        out[f"recall_at_{k}"] = sum(recall_at_k(run[q], qrels[q], k) for q in scored) / len(scored)
    return out


def sample_corpus(corpus: Path, max_documents: int, out: Path) -> tuple[Path, set[str]]:
    """A fixed sample of ``max_documents`` rows of a BEIR corpus, picked by a hash of each id (so the same rows on
    every machine, whatever the file's order), written to ``out`` (a run file, never shipped). Returns the
    sample's path and ids."""

    rows = list(read_jsonl(corpus))
    if max_documents >= len(rows):
        return corpus, {str(row["_id"]) for row in rows}
    rank = sorted(range(len(rows)), key=lambda i: hashlib.sha256(str(rows[i]["_id"]).encode()).hexdigest())
    keep = sorted(rank[:max_documents])
    text = "".join(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in keep)
    if not out.is_file() or out.read_text(encoding="utf-8") != text:  # a rerun keeps the file its encode knows
        atomic_write_text(out, text)
    return out, {str(rows[i]["_id"]) for i in keep}


def evaluate_retrieval(
    embedder,
    task_dir: str | os.PathLike,
    *,
    split: str = "test",
    k_values: Sequence[int] = (10, 100),
    index_type: str = "flat",
    work_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    max_documents: int | None = None,
) -> dict:
    """Encode a BEIR folder's corpus, index it, search its queries; returns ``ndcg_at_10``, ``recall_at_100``
    (and the other k values), ``main_score`` (= nDCG@10), counts and timings.

    ``work_dir`` keeps the vectors and index (a rerun with the same model reuses them: the encode resumes);
    by default a temporary folder is used and removed. Queries use the embedder's query instruction, the corpus
    its document instruction. ``max_documents`` scores a fixed sample of the corpus instead (``sample_corpus``;
    qrels and queries restricted to it): a quicker run whose scores are not comparable with the full task's.
    """
    task_dir = Path(task_dir)
    corpus = task_dir / "corpus.jsonl"
    for path in (corpus, task_dir / "queries.jsonl"):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: {task_dir} is not a BEIR folder (corpus.jsonl, "
                                    f"queries.jsonl, qrels/{split}.tsv).")
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be >= 1 (got {max_documents}); leave it unset for the whole corpus.")
    qrels = read_qrels(task_dir / "qrels" / f"{split}.tsv")
    queries = {str(row["_id"]): row["text"] for row in read_jsonl(task_dir / "queries.jsonl")
               if str(row["_id"]) in qrels}
    if not queries:
        raise ValueError(f"No query in {task_dir / 'queries.jsonl'} appears in qrels/{split}.tsv.")
    temp = None
    if work_dir is None:
        temp = tempfile.TemporaryDirectory(prefix="embedkit-retrieval-")
        work_dir = temp.name
    work = Path(work_dir)
    try:
        if max_documents is not None:  # its own sub-folder: an encode folder refuses another input's vectors
            work = work / f"sample-{max_documents}"
            work.mkdir(parents=True, exist_ok=True)
            corpus, kept = sample_corpus(corpus, max_documents, work / "corpus.jsonl")
            qrels = {q: {d: r for d, r in docs.items() if d in kept} for q, docs in qrels.items()}
            queries = {q: text for q, text in queries.items() if any(r > 0 for r in qrels[q].values())}
        timings = {}
        began = time.perf_counter()
        encoded = encode_corpus(embedder, [corpus], work / "vectors", role="document", batch_size=batch_size,
                                rank=0, world_size=1)
        timings["encode"] = time.perf_counter() - began
        began = time.perf_counter()
        build_index(work / "vectors", work / "index", BuildOptions(index_type=index_type), texts=False)
        timings["index"] = time.perf_counter() - began
        began = time.perf_counter()
        index = Index.load(work / "index", embedder=embedder)
        ids = list(queries)
        hits = index.search([queries[q] for q in ids], k=max(k_values))
        timings["search"] = time.perf_counter() - began
        run = {q: [h.id for h in found] for q, found in zip(ids, hits, strict=True)}
        scores = score_run(run, qrels, k_values)
    finally:
        if temp is not None:
            temp.cleanup()
    return {
        "task": task_dir.name, "split": split, **scores,
        "main_score": scores.get("ndcg_at_10", next(iter(scores.values()))),
        "n_queries": len(run), "n_documents": encoded.count, "index_type": index_type,
        "max_documents": max_documents, **({"index_dir": str(work / "index")} if temp is None else {}),
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }
