"""A retrieval dev set for recipe choices (issue 16): the test sets of eval/RESULTS.md must not steer training
choices, and ../shared has no retrieval dev split. distill-gemma3-270m-cpu caps pairs/SQuADQuestions at its first
4,000 rows, so its last rows are questions and answer sentences that recipe never reads (recipes that do not cap the
source may have seen some): each question searches the distinct sentences of those rows (one relevant each);
reported: nDCG@10, recall@1 and recall@10, plus STS-B dev Spearman for reference.

The test sets that trail are passage retrieval (MSMARCO-5k, DBPedia-5k: documents of 52-60 words, median), and a
model trained on sentences can rank sentences well and passages badly. The rows are in article order, so runs of
consecutive distinct sentences are passages of one article: ``passage_*`` scores each question against the
passages of ``--passage-sentences`` (2: 54 words, median) consecutive sentences, the relevant one holding its answer
sentence, its neighbours from the same article among the distractors.

    python bench/bench_dev_retrieval.py runs/distill-gemma3-270m-cpu/final [more saved embedders or specs ...]
    python bench/bench_dev_retrieval.py all-MiniLM-L6-v2   # the teacher, for reference

Results append to bench/results/dev_retrieval.jsonl (one line per model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

from embedkit.embedder import Embedder
from embedkit.evaluation.mteb_model import LoadedModel, open_eval_model
from embedkit.evaluation.sts import sts_spearman
from embedkit.hardware import describe_cpu
from embedkit.io import iter_text_lines

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SOURCE = "pairs/SQuADQuestions/train.jsonl"
RECIPE = REPO / "recipes" / "distill-gemma3-270m-cpu.yaml"  # its `limit` on SOURCE: rows past it are unseen
RESULTS = REPO / "bench" / "results" / "dev_retrieval.jsonl"


def recipe_limit() -> int:
    """The first rows of SOURCE that the recipe trains on."""
    stage = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))["stages"][0]
    return next(source["limit"] for source in stage["data"] if source["path"] == SOURCE)


def heldout_pairs(data: Path, rows: int) -> tuple[list[str], list[str], np.ndarray]:
    """Questions, distinct sentences and each question's sentence index, from the source's last ``rows`` rows."""
    lines = [json.loads(line) for _, line in iter_text_lines(data / SOURCE) if line.strip()]
    limit = recipe_limit()
    if len(lines) - rows < limit:
        raise SystemExit(f"{SOURCE} has {len(lines)} rows: --rows {rows} would reach rows {RECIPE.name} trains on; "
                         f"use at most {len(lines) - limit}")
    picked = lines[-rows:]
    sentences = list(dict.fromkeys(r["positive"] for r in picked))
    where = {s: i for i, s in enumerate(sentences)}
    return [r["anchor"] for r in picked], sentences, np.array([where[r["positive"]] for r in picked])


def passages(sentences: list[str], gold: np.ndarray, size: int) -> tuple[list[str], np.ndarray]:
    """Runs of ``size`` consecutive distinct sentences joined into passages, and each question's passage."""
    return [" ".join(sentences[i:i + size]) for i in range(0, len(sentences), size)], gold // size


class PlainTexts:
    """A sentence-transformers model (all-MiniLM-L6-v2, the distillation teacher) with the calls ``score`` and
    ``sts_spearman`` make: unit vectors of the plain texts, no instructions."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded

    def encode(self, texts: list[str], normalize: bool = True) -> np.ndarray:
        vectors = np.asarray(self.loaded.encode(list(texts), None, None), dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True) if normalize else vectors

    encode_queries = encode_documents = encode


def open_encoder(spec: str, max_length: int) -> Embedder | PlainTexts:
    """An embedkit model as the harness opens it, or a sentence-transformers one (``all-MiniLM-L6-v2``)."""
    loaded = open_eval_model(spec, max_length=max_length)
    return loaded.model if loaded.backend == "embedkit" else PlainTexts(loaded)


def score(queries: np.ndarray, documents: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """nDCG@10 of unit query and document vectors; with one relevant document it equals 1 / log2(rank + 1) when
    the rank is within 10."""
    scores = queries @ documents.T
    ranks = (scores > scores[np.arange(len(gold)), gold][:, None]).sum(1)  # 0 = first
    ndcg = np.where(ranks < 10, 1 / np.log2(ranks + 2), 0.0)
    return {"ndcg_at_10": float(ndcg.mean()), "recall_at_1": float((ranks == 0).mean()),
            "recall_at_10": float((ranks < 10).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--passage-sentences", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    questions, sentences, gold = heldout_pairs(args.data, args.rows)
    docs, doc_gold = passages(sentences, gold, args.passage_sentences)
    for model in args.models:
        embedder = open_encoder(model, args.max_length)
        queries = embedder.encode_queries(questions, normalize=True)
        by_sentence = score(queries, embedder.encode_documents(sentences, normalize=True), gold)
        by_passage = score(queries, embedder.encode_documents(docs, normalize=True), doc_gold)
        result = {"model": model, "rows": args.rows, "sentences": len(sentences), **by_sentence,
                  "passage_sentences": args.passage_sentences, "passages": len(docs),
                  **{f"passage_{k}": v for k, v in by_passage.items()},
                  "sts_dev": sts_spearman(embedder, args.data, "dev"), "cpu": describe_cpu()}
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
