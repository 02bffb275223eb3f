"""Builders for the evaluation tests: tiny task folders in the ../shared/data layout, and fake models whose
vectors are chosen so every mteb main score has a known value."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

STORIES = Path(__file__).resolve().parent.parent.parent / "shared" / "models" / "stories260K"
LABELS = ("alpha", "beta", "gamma")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_task(folder: Path, info: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return folder


def make_sts(root: Path, name: str = "TinySTS", n: int = 12) -> Path:
    folder = write_task(root / "sts" / name, {"name": name, "type": "sts", "min_score": 0.0, "max_score": 5.0,
                                              "main_score": "cosine_spearman", "splits": ["test"]})
    write_jsonl(folder / "test.jsonl", [
        {"sentence1": f"the cat sat on mat number {i}", "sentence2": f"a dog ran in park number {i}",
         "score": 5.0 * i / (n - 1)} for i in range(n)])
    return folder


def make_pair(root: Path, name: str = "TinyPairs", n: int = 10) -> Path:
    folder = write_task(root / "pair_classification" / name,
                        {"name": name, "type": "pair_classification", "main_score": "max_ap"})
    write_jsonl(folder / "test.jsonl", [
        {"sentence1": f"pair left {i}", "sentence2": f"pair right {i}", "label": i % 2} for i in range(n)])
    return folder


def make_classification(root: Path, name: str = "TinyIntents") -> Path:
    folder = write_task(root / "classification" / name,
                        {"name": name, "type": "classification", "main_score": "accuracy", "n_labels": 3})
    write_jsonl(folder / "train.jsonl", [{"text": f"train {label} example {i}", "label": label}
                                         for i in range(10) for label in LABELS])
    write_jsonl(folder / "test.jsonl", [{"text": f"test {label} example {i}", "label": label}
                                        for i in range(3) for label in LABELS])
    return folder


def make_clustering(root: Path, name: str = "TinyTopics") -> Path:
    folder = write_task(root / "clustering" / name,
                        {"name": name, "type": "clustering", "main_score": "v_measure", "n_clusters": 3})
    write_jsonl(folder / "test.jsonl", [{"text": f"topic {label} title {i}", "label": label}
                                        for i in range(10) for label in LABELS])
    return folder


def make_retrieval(root: Path, name: str = "TinyBEIR", n: int = 6) -> Path:
    folder = write_task(root / "retrieval" / name,
                        {"name": name, "type": "retrieval", "main_score": "ndcg_at_10", "splits": ["test"]})
    write_jsonl(folder / "corpus.jsonl", [{"_id": f"d{i}", "title": f"Title {i}" if i % 2 else "",
                                           "text": f"document body {i}"} for i in range(n * 2)])
    write_jsonl(folder / "queries.jsonl", [{"_id": f"q{i}", "text": f"question {i}"} for i in range(n)])
    (folder / "qrels").mkdir()
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(n)), encoding="utf-8")
    return folder


def make_all(root: Path) -> list[Path]:
    """One tiny task of each type, plus a training-data folder the searches must skip."""
    folders = [make_sts(root), make_retrieval(root), make_classification(root), make_clustering(root),
               make_pair(root)]
    skipped = write_task(root / "triplets" / "TinyTriplets", {"name": "TinyTriplets", "type": "triplets"})
    write_jsonl(skipped / "train.jsonl", [{"anchor": "a", "positive": "b", "negative": "c"}])
    return folders


def oracle_vector(text: str, dim: int = 8) -> np.ndarray:
    """Vectors that make every tiny task perfectly solvable (so each main score is exactly 1.0).

    sts: 'the cat ... {i}' is e0, 'a dog ... {i}' is at an angle that shrinks as i (and the gold score) grows;
    pairs: odd pairs (label 1) get equal vectors, even pairs orthogonal ones; classification and clustering:
    one axis per label; retrieval: question i and document i share axis i.
    """
    words = text.replace(" ", "_").split("_")
    number = int(words[-1]) if words[-1].isdigit() else 0
    v = np.zeros(dim, dtype=np.float32)
    if text.startswith("the cat"):
        v[0] = 1
    elif text.startswith("a dog"):
        angle = (math.pi / 2) * (1 - number / 11)
        v[0], v[1] = math.cos(angle), math.sin(angle)
    elif text.startswith("pair"):
        v[number % dim] = 1
        if number % 2 == 0 and text.startswith("pair right"):
            v[:] = 0
            v[(number + 1) % dim] = 1
    elif any(label in text for label in LABELS):
        label = next(i for i, name in enumerate(LABELS) if name in text)
        v[label] = 1
        v[3 + number % 3] = 0.01
    else:  # retrieval: question i <-> document i (with or without its title)
        v[number % dim] = 1
        v[(number // dim + 4) % dim] += 0.5 * (number >= dim)
    return v / np.linalg.norm(v)


class FakeModel:
    """A LoadedModel-compatible stand-in that records every encode call."""

    def __init__(self, vector=oracle_vector, own_instructions=None, label="oracle", fingerprint="f" * 16):
        from embedkit.evaluation.mteb_model import LoadedModel

        self.calls: list[tuple[str | None, list[str]]] = []

        def encode(texts, instruction, batch_size):
            self.calls.append((instruction, list(texts)))
            return np.stack([vector(t) for t in texts]).astype(np.float32)

        self.loaded = LoadedModel(label=label, spec="fake", backend="embedkit", encode=encode,
                                  fingerprint=fingerprint, dimension=8, parameters=0, max_length=64, config={},
                                  own_instructions=own_instructions or {})
