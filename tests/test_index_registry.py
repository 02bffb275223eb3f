"""A new index type is one registry entry, made here, outside the package: it builds, calibrates, saves, loads
(memory-mapped) and searches like the built-in ones, with its own validated build option and search setting."""

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from embedkit import Embedder
from embedkit.corpus import encode_corpus, open_vectors
from embedkit.index import (
    BuildOptions,
    Index,
    IndexType,
    IntParam,
    Knob,
    build_faiss,
    build_index,
    exact_knn,
    get_index_type,
    recall,
    register_index_type,
    type_names,
)
from embedkit.index.registry import INDEX_TYPES

REPO = Path(__file__).resolve().parent.parent
STORIES = REPO.parent / "shared" / "models" / "stories260K"
SENTENCES = REPO.parent / "shared" / "data" / "unlabeled" / "TinyStories" / "sentences.txt"


def TEXTS() -> list[str]:  # noqa: N802
    return SENTENCES.read_text(encoding="utf-8").splitlines()[:60]


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps({"_id": f"s{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS())),
                    encoding="utf-8")
    embedder = Embedder.from_pretrained(STORIES, dtype="float32", max_length=48)
    encode_corpus(embedder, [path], folder / "vectors", model_spec=STORIES)
    return folder / "vectors"


def _hnsw_sq8_params(index, settings: dict):
    return faiss.SearchParametersHNSW(efSearch=int(settings["efSearch"])) if "efSearch" in settings else None


TOY = IndexType(
    name="hnsw-sq8",  # a graph over 8-bit scalar-quantized vectors: trained, calibrated, memory-mappable
    factory=lambda count, dimension, options: (f"HNSW{options.hnsw_m}_SQ8", count),
    params=(IntParam("hnsw_m", 4, 64),),
    knobs=(Knob("efSearch", "ef_search", lambda index: [8, 16, 32, 64, 128, 256], at_least_k=True, default=16),),
    search_params=_hnsw_sq8_params,
)


@pytest.fixture
def toy():
    register_index_type(TOY)
    yield TOY
    INDEX_TYPES.pop(TOY.name)


def clustered(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    c = np.random.default_rng(0).standard_normal((20, d)).astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    x = c[rng.integers(0, 20, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_a_type_registered_from_outside_builds_calibrates_and_searches(toy):
    assert type_names()[-1] == "hnsw-sq8" and get_index_type("hnsw-sq8") is toy
    x = clustered(2000)
    index, info = build_faiss(x, BuildOptions(index_type="hnsw-sq8", hnsw_m=16, target_recall=0.9), "ip")
    assert (info["type"], info["factory"], info["train_rows"]) == ("hnsw-sq8", "HNSW16_SQ8", 2000)
    assert info["calibration"]["recall_at_10"] >= 0.9 and set(info["search"]) == {"efSearch"}
    queries = clustered(50, seed=1)
    _, truth = exact_knn(x, queries, 10, "ip")
    _, found = index.search(queries, 10, params=toy.faiss_params(index, info["search"]))
    assert recall(found, truth) >= 0.8


def test_its_options_are_validated_and_its_folder_loads_and_searches(toy, tmp_path, vectors):
    with pytest.raises(ValueError, match=r"hnsw_m \(--hnsw-m\) must be an integer from 4 to 64, got 100\."):
        BuildOptions(index_type="hnsw-sq8", hnsw_m=100)  # the plug-in's own, stricter range applies too
    with pytest.raises(ValueError, match="index type must be one of auto, flat, hnsw, ivf, ivfpq, int8_flat, "
                                         "fp16_flat, binary_flat, binary_hnsw, hnsw-sq8, got .sq8."):
        BuildOptions(index_type="sq8")

    build_index(vectors, tmp_path / "i", BuildOptions(index_type="hnsw-sq8", hnsw_m=8))
    x = open_vectors(vectors).load()
    for mmap in (False, True):
        index = Index.load(tmp_path / "i", mmap=mmap, verify=True)
        assert index.kind is toy and index.index_type == "hnsw-sq8"
        hits = index.search(x[:5], k=3, ef_search=64)
        assert [row[0].id for row in hits] == [f"s{i}" for i in range(5)] and hits[0][0].text == TEXTS()[0]
    with pytest.raises(ValueError, match=r"ef_search \(--ef-search\) must be an integer from 1"):
        index.search(x[:1], k=3, ef_search=0)

