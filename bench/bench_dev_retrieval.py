"""A retrieval dev set for recipe choices (issue 16): the test sets of eval/RESULTS.md must not steer training
choices, and ../shared has no retrieval dev split. distill-gemma3-270m-cpu caps pairs/SQuADQuestions at its first
4,000 rows, so its last rows are questions and answer sentences that recipe never reads (recipes that do not cap the
source may have seen some): each question searches the distinct sentences of those rows (one relevant each);
reported: nDCG@10, recall@1 and recall@10, plus STS-B dev Spearman for reference.

    python bench/bench_dev_retrieval.py runs/distill-gemma3-270m-cpu/final [more saved embedders or specs ...]

Results append to bench/results/dev_retrieval.jsonl (one line per model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

from embedkit.embedder import Embedder, open_model
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


def score(embedder: Embedder, questions: list[str], sentences: list[str], gold: np.ndarray) -> dict[str, float]:
    """nDCG@10 with one relevant document equals 1 / log2(rank + 1) when the rank is within 10."""
    q = embedder.encode_queries(questions, normalize=True)
    d = embedder.encode_documents(sentences, normalize=True)
    scores = q @ d.T
    ranks = (scores > scores[np.arange(len(gold)), gold][:, None]).sum(1)  # 0 = first
    ndcg = np.where(ranks < 10, 1 / np.log2(ranks + 2), 0.0)
    return {"ndcg_at_10": float(ndcg.mean()), "recall_at_1": float((ranks == 0).mean()),
            "recall_at_10": float((ranks < 10).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    questions, sentences, gold = heldout_pairs(args.data, args.rows)
    for model in args.models:
        embedder = open_model(model, max_length=args.max_length)
        result = {"model": model, "rows": args.rows, "sentences": len(sentences), **score(embedder, questions,
                  sentences, gold), "sts_dev": sts_spearman(embedder, args.data, "dev"), "cpu": describe_cpu()}
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
