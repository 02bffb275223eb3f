"""Retrieval evaluation: metrics against hand-computed values, and the full encode -> index -> search pipeline
on a small BEIR folder whose answers are known."""

import json
import math
from pathlib import Path

import pytest

from embedkit import Embedder
from embedkit.evaluation.retrieval import (
    evaluate_retrieval,
    ndcg_at_k,
    read_qrels,
    recall_at_k,
    sample_corpus,
    score_run,
)

REPO = Path(__file__).resolve().parent.parent
STORIES = REPO.parent / "shared" / "models" / "stories260K"
SENTENCES = REPO.parent / "shared" / "data" / "unlabeled" / "TinyStories" / "sentences.txt"


def test_ndcg_and_recall_match_hand_computed_values():
    ranked = ["x", "a", "y", "b"]
    relevance = {"a": 2, "b": 1, "c": 3, "z": 0}
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 3 + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranked, relevance, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(ranked, relevance, 1) == 0.0
    assert ndcg_at_k(["c", "a", "b"], relevance, 3) == pytest.approx(1.0)
    assert recall_at_k(ranked, relevance, 10) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, relevance, 2) == pytest.approx(1 / 3)
    scores = score_run({"q1": ranked, "q2": ["c"], "q3": ["a"]}, {"q1": relevance, "q2": {"c": 1}}, k_values=(10,))
    assert scores == pytest.approx({"ndcg_at_10": (dcg / idcg + 1) / 2, "recall_at_10": (2 / 3 + 1) / 2})
    with pytest.raises(ValueError, match="No query of the run has a relevant document"):
        score_run({"q9": ["a"]}, {"q1": relevance})


def test_read_qrels_checks_header_and_rows(tmp_path):
    path = tmp_path / "q.tsv"
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t0\n")
    assert read_qrels(path) == {"q1": {"d1": 2, "d2": 0}}
    path.write_text("qid\tdid\tscore\n")
    with pytest.raises(ValueError, match=r"q\.tsv:1: expected the header"):
        read_qrels(path)
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\thigh\n")
    with pytest.raises(ValueError, match=r"q\.tsv:2: score 'high' is not an integer"):
        read_qrels(path)


def _beir(folder: Path, texts: list[str], queries: dict[str, int]) -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                                 for i, t in enumerate(texts)))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": texts[i]}) + "\n"
                                                  for q, i in queries.items()))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\td{i}\t1\n" for q, i in queries.items()))
    return folder


def test_pipeline_finds_documents_identical_to_the_queries(tmp_path):
    texts = SENTENCES.read_text(encoding="utf-8").splitlines()[:40]
    task = _beir(tmp_path / "Toy", texts, {"q1": 3, "q2": 17, "q3": 33})
    embedder = Embedder.from_pretrained(STORIES, dtype="float32", max_length=48)
    result = evaluate_retrieval(embedder, task, work_dir=tmp_path / "work")
    assert result["ndcg_at_10"] == pytest.approx(1.0) and result["recall_at_100"] == pytest.approx(1.0)
    assert result["main_score"] == result["ndcg_at_10"]
    assert (result["task"], result["n_queries"], result["n_documents"]) == ("Toy", 3, 40)
    again = evaluate_retrieval(embedder, task, work_dir=tmp_path / "work", index_type="hnsw")
    assert again["ndcg_at_10"] == pytest.approx(1.0)  # vectors reused from work_dir, index rebuilt as HNSW
    # with a query instruction the queries no longer equal the documents, but the pipeline uses it
    instructed = Embedder.from_pretrained(STORIES, dtype="float32", max_length=48, query_instruction="Q: ")
    scored = evaluate_retrieval(instructed, task, k_values=(1, 10))
    assert set(scored) >= {"ndcg_at_1", "recall_at_1", "ndcg_at_10", "recall_at_10"}
    assert 0.0 <= scored["ndcg_at_1"] <= 1.0
    with pytest.raises(FileNotFoundError, match="is not a BEIR folder"):
        evaluate_retrieval(embedder, tmp_path / "missing")


def test_a_corpus_sample_is_fixed_by_ids_and_restricts_qrels_and_queries(tmp_path):
    """The demo scores a sample of MSMARCO-5k: the same rows whatever the file order; queries without a relevant
    document in the sample are dropped, and a second run reuses the encoded sample."""
    texts = SENTENCES.read_text(encoding="utf-8").splitlines()[:40]
    task = _beir(tmp_path / "Toy", texts, {f"q{i}": i for i in range(0, 40, 4)})
    path, kept = sample_corpus(task / "corpus.jsonl", 12, tmp_path / "a.jsonl")
    lines = (task / "corpus.jsonl").read_text().splitlines()
    (tmp_path / "reversed.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    _, kept_reversed = sample_corpus(tmp_path / "reversed.jsonl", 12, tmp_path / "b.jsonl")
    assert len(kept) == 12 and kept == kept_reversed and len(path.read_text().splitlines()) == 12
    assert sample_corpus(task / "corpus.jsonl", 40, tmp_path / "c.jsonl") == (task / "corpus.jsonl", {
        f"d{i}" for i in range(40)}) and not (tmp_path / "c.jsonl").exists()

    embedder = Embedder.from_pretrained(STORIES, dtype="float32", max_length=48)
    result = evaluate_retrieval(embedder, task, work_dir=tmp_path / "work", max_documents=12)
    expected_queries = sum(f"d{i}" in kept for i in range(0, 40, 4))
    assert (result["n_documents"], result["n_queries"]) == (12, expected_queries) and expected_queries > 0
    assert result["ndcg_at_10"] == pytest.approx(1.0)  # each query is its own document, still in the sample
    assert Path(result["index_dir"]) == tmp_path / "work" / "sample-12" / "index"
    stamp = (tmp_path / "work" / "sample-12" / "corpus.jsonl").stat().st_mtime_ns
    assert evaluate_retrieval(embedder, task, work_dir=tmp_path / "work", max_documents=12)["n_documents"] == 12
    assert (tmp_path / "work" / "sample-12" / "corpus.jsonl").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="max_documents must be >= 1 \\(got 0\\)"):
        evaluate_retrieval(embedder, task, max_documents=0)


@pytest.mark.slow
def test_msmarco_5k_smollm2_causal_mean(tmp_path):
    """The real figure: smollm2-135m (causal, mean) on MSMARCO-5k through encode -> flat index -> search.
    mteb's evaluator gives nDCG@10 0.2727 / recall@100 0.2919 for the same model (eval/results)."""
    task = REPO.parent / "shared" / "data" / "retrieval" / "MSMARCO-5k"
    embedder = Embedder.from_pretrained("smollm2-135m", attention="causal", pooling="mean")
    result = evaluate_retrieval(embedder, task, work_dir=tmp_path)
    assert result["n_documents"] == 5000 and result["n_queries"] == 43
    assert result["ndcg_at_10"] == pytest.approx(0.2727, abs=0.01)
    assert result["recall_at_100"] == pytest.approx(0.2919, abs=0.01)
