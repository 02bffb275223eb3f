"""Index build / load / search: exact results, ids and texts mapped, calibration, mmap, refusals, CLI."""

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from embedkit import Embedder, Index
from embedkit.cli import app
from embedkit.corpus import encode_corpus, open_vectors
from embedkit.index import (
    BuildOptions,
    build_faiss,
    build_index,
    choose_type,
    exact_knn,
    factory_string,
    get_index_type,
    locality_order,
    recall,
)

REPO = Path(__file__).resolve().parent.parent
STORIES = REPO.parent / "shared" / "models" / "stories260K"
SENTENCES = REPO.parent / "shared" / "data" / "unlabeled" / "TinyStories" / "sentences.txt"
N_TEXTS = 120


@pytest.fixture(scope="module")
def embedder():
    return Embedder.from_pretrained(STORIES, dtype="float32", max_length=48)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    texts = SENTENCES.read_text(encoding="utf-8").splitlines()[:N_TEXTS]
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps({"_id": f"s{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(texts)),
                    encoding="utf-8")
    return path, texts


@pytest.fixture(scope="module")
def vectors(tmp_path_factory, embedder, corpus):
    out = tmp_path_factory.mktemp("vec") / "vectors"
    encode_corpus(embedder, [corpus[0]], out, model_spec=STORIES, shard_size=50)
    return out


@pytest.fixture(scope="module")
def flat(tmp_path_factory, vectors):
    out = tmp_path_factory.mktemp("idx") / "flat"
    build_index(vectors, out, BuildOptions(index_type="flat"))
    return out


def clustered(n: int, d: int = 32, centers: int = 40, seed: int = 0) -> np.ndarray:
    """Normalised points around 40 fixed centres (``seed`` varies the points, not the centres)."""
    c = np.random.default_rng(0).standard_normal((centers, d)).astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    x = c[rng.integers(0, centers, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_search_by_text_is_exact_with_ids_and_texts(flat, embedder, corpus):
    _, texts = corpus
    index = Index.load(flat)
    assert (len(index), index.dimension, index.metric, index.index_type) == (N_TEXTS, 64, "ip", "flat")
    assert index.has_texts
    hits = index.search([texts[7], texts[42]], k=5)
    assert [h[0].id for h in hits] == ["s7", "s42"]  # a corpus text finds itself first
    assert hits[0][0].text == texts[7] and hits[0][0].score == pytest.approx(1.0, abs=1e-4)
    corpus_vectors = embedder.encode(texts)
    query = embedder.encode(["a little girl went to the park"])
    expected = np.argsort(-(corpus_vectors @ query[0]))[:10]
    got = index.search(query, k=10)[0]
    assert [h.id for h in got] == [f"s{i}" for i in expected]
    assert [h.score for h in got] == pytest.approx((corpus_vectors @ query[0])[expected].tolist(), abs=1e-4)
    assert index.search("a little girl went to the park", k=3)[0][0].id == f"s{expected[0]}"


def test_k_larger_than_the_corpus_returns_what_exists(flat):
    index = Index.load(flat)
    hits = index.search(np.ones((1, 64), dtype=np.float32), k=1000)[0]
    assert len(hits) == N_TEXTS and len({h.id for h in hits}) == N_TEXTS
    mapped = Index.load(flat, mmap=True).search(np.ones((1, 64), dtype=np.float32), k=1000)[0]  # IO_FLAG_MMAP_IFC
    assert [(h.id, h.score) for h in mapped] == [(h.id, h.score) for h in hits]
    with pytest.raises(ValueError, match="k must be at least 1"):
        index.search("x", k=0)


def test_other_model_or_dimension_is_refused(flat, tmp_path):
    other = Embedder.from_pretrained(STORIES, dtype="float32", max_length=48, pooling="last")
    with pytest.raises(ValueError, match=r"fingerprint .* is not the one the index was built with"):
        Index.load(flat, embedder=other)
    assert Index.load(flat, embedder=other, check_model=False).search("a dog", k=2)[0]
    with pytest.raises(ValueError, match="Query vectors have dimension 8, the index 64"):
        Index.load(flat).search(np.ones((1, 8), dtype=np.float32))

    class Wide:  # a query model of another dimension
        dimension = 128

        def fingerprint(self):
            return "x"

    with pytest.raises(ValueError, match="gives 128-d vectors but the index .* holds 64-d vectors"):
        Index.load(flat, embedder=Wide())


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_approximate_types_calibrate_and_mmap_gives_same_results(vectors, tmp_path, kind):
    out = tmp_path / kind
    result = build_index(vectors, out, BuildOptions(index_type=kind, target_recall=0.9))
    info = result.info
    assert info["type"] == kind and info["count"] == N_TEXTS
    expected_param = {"hnsw": "efSearch", "ivf": "nprobe", "ivfpq": "nprobe"}[kind]
    assert expected_param in info["search"]
    assert info["calibration"]["recall_at_10"] >= 0.9 or kind == "ivfpq"
    query = open_vectors(vectors).load()[:5]
    in_ram = Index.load(out, mmap=False).search(query, k=5)
    mapped = Index.load(out, mmap=True).search(query, k=5)
    assert [[h.id for h in r] for r in in_ram] == [[h.id for h in r] for r in mapped]
    if kind == "hnsw":  # rows added in locality order, read from 3 shards: each row still finds its own id
        assert [r[0].id for r in in_ram] == [f"s{i}" for i in range(5)]


def test_calibration_reaches_target_on_clustered_vectors():
    x = clustered(4000)
    for kind, param in (("hnsw", "efSearch"), ("ivf", "nprobe"), ("ivfpq", "k_factor")):
        index, info = build_faiss(x, BuildOptions(index_type=kind, target_recall=0.95), "ip")
        assert info["calibration"]["recall_at_10"] >= 0.95, (kind, info["calibration"])
        assert param in info["search"] and index.ntotal == 4000
        queries = clustered(100, seed=1)
        _, truth = exact_knn(x, queries, 10, "ip")
        _, found = index.search(queries, 10, params=get_index_type(kind).faiss_params(index, info["search"]))
        assert recall(found, truth) >= 0.85, kind  # held-out queries: close to the calibrated recall


def test_hnsw_locality_order_keeps_row_positions_as_labels():
    x = clustered(4000)
    order, facts = locality_order(x, "ip")
    assert sorted(order.tolist()) == list(range(4000)) and facts["clusters"] == 63  # round(sqrt(4000))
    # rows of one of the 40 true clusters end up close together: far fewer cluster changes along the order
    true_cluster = np.random.default_rng(1).integers(0, 40, 4000)  # clustered()'s own first draw
    assert (np.diff(true_cluster[order]) != 0).sum() < 0.1 * (np.diff(true_cluster) != 0).sum()
    ordered, info = build_faiss(x, BuildOptions(index_type="hnsw"), "ip")
    plain, plain_info = build_faiss(x, BuildOptions(index_type="hnsw", locality_order=False), "ip")
    assert isinstance(ordered, faiss.IndexIDMap) and info["locality_order"]["clusters"] == 63
    assert faiss.downcast_index(ordered.index).hnsw.efConstruction == 160  # the default build depth
    assert isinstance(plain, faiss.IndexHNSW) and plain_info["locality_order"] is None
    params = get_index_type("hnsw").faiss_params(ordered, {"efSearch": 256})
    _, found = ordered.search(x[:500], 1, params=params)
    assert (found[:, 0] == np.arange(500)).all()  # each row finds itself, by its own position
    _, truth = exact_knn(x, x[:50], 10, "ip")
    _, found = ordered.search(x[:50], 10, params=params)
    assert (found == truth).mean() > 0.95


def test_auto_type_and_factory_strings():
    assert choose_type(5_000, 256) == "flat"
    assert choose_type(1_000_000, 256, memory=16 << 30) == "hnsw"
    assert choose_type(1_000_000, 4096, memory=16 << 30) == "ivfpq"
    assert choose_type(20_000_000, 64, memory=1 << 40) == "ivfpq"
    assert factory_string("ivf", 1_000_000, 256, BuildOptions())[0] == "IVF1000,Flat"
    assert factory_string("ivfpq", 1_000_000, 256, BuildOptions())[0] == "IVF1000,PQ64x8,RFlat"
    with pytest.raises(ValueError, match="pq_m=7 must divide the dimension 256"):
        factory_string("ivfpq", 10_000, 256, BuildOptions(pq_m=7))
    with pytest.raises(ValueError, match="index type must be one of auto, flat"):
        BuildOptions(index_type="annoy")


def test_l2_metric_for_unnormalised_vectors(tmp_path, corpus):
    e = Embedder.from_pretrained(STORIES, dtype="float32", max_length=48, normalize=False)
    encode_corpus(e, [corpus[0]], tmp_path / "v", shard_size=1000)
    result = build_index(tmp_path / "v", tmp_path / "i")
    assert (result.info["type"], result.info["metric"]) == ("flat", "l2")
    index = Index.load(tmp_path / "i", embedder=e)
    hits = index.search([corpus[1][3]], k=3)[0]
    assert hits[0].id == "s3" and hits[0].score == pytest.approx(0.0, abs=1e-3)  # squared L2 distance
    assert hits[1].score >= hits[0].score
    assert index.info["model"]["spec"] == str(STORIES.resolve())  # loadable from any working directory


def test_rebuild_is_a_no_op_and_damaged_index_or_shard_is_named(vectors, flat, tmp_path):
    assert build_index(vectors, flat, BuildOptions(index_type="flat")).up_to_date
    copy = tmp_path / "copy"
    shutil.copytree(flat, copy)
    (copy / "ids.offsets.npy").write_bytes(b"short")
    with pytest.raises(ValueError, match=r"is damaged: .*ids\.offsets\.npy has 5 bytes"):
        Index.load(copy)
    with pytest.raises(FileNotFoundError, match="not an embedkit index folder"):
        Index.load(tmp_path)
    broken = tmp_path / "vectors"
    shutil.copytree(vectors, broken)
    (broken / "shards" / "shard-00002.npy").unlink()
    with pytest.raises(ValueError, match=r"Shard shard-00002 .*shard-00002\.npy is missing"):
        build_index(broken, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "x").write_text("x")
    with pytest.raises(ValueError, match="is not an embedkit index folder"):
        build_index(vectors, tmp_path / "occupied")


def test_texts_left_out_when_the_corpus_changed(tmp_path, embedder, corpus):
    path = tmp_path / "c.jsonl"
    shutil.copy(corpus[0], path)
    encode_corpus(embedder, [path], tmp_path / "v", shard_size=1000)
    path.write_text(path.read_text().replace("girl", "gIrl"))
    result = build_index(tmp_path / "v", tmp_path / "i")
    assert not result.texts and "changed since it was encoded" in result.note
    hits = Index.load(tmp_path / "i").search(np.ones((1, 64), dtype=np.float32), k=2)[0]
    assert hits[0].text is None and hits[0].id.startswith("s")


def test_search_vectors_of_a_float16_corpus_match_exact(tmp_path, embedder, corpus):
    encode_corpus(embedder, [corpus[0]], tmp_path / "v", vector_dtype="float16", shard_size=40)
    build_index(tmp_path / "v", tmp_path / "i", BuildOptions(index_type="flat"))
    x = open_vectors(tmp_path / "v").load()
    q = x[:3]
    _, truth = exact_knn(x, q, 4, "ip")
    _, got = Index.load(tmp_path / "i").search_vectors(q, 4)
    assert got.tolist() == truth.tolist()
    assert faiss.read_index(str(tmp_path / "i" / "index.faiss")).ntotal == N_TEXTS


def test_cli_encode_index_search(tmp_path, corpus, monkeypatch):
    runner = CliRunner()
    out, idx = tmp_path / "v", tmp_path / "i"
    monkeypatch.chdir(REPO)  # a relative model path: the index must still find the model from elsewhere
    args = ["encode", "../shared/models/stories260K", "--input", str(corpus[0]), "--output", str(out),
            "--dtype", "float32", "--max-length", "48", "--shard-size", "50"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"{N_TEXTS} vectors" in result.output
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "Nothing to do" in result.output
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["index", "build", str(out), "--output", str(idx), "--type", "flat"])
    assert result.exit_code == 0 and "flat (Flat, ip)" in result.output, result.output
    result = runner.invoke(app, ["search", str(idx), corpus[1][5], "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    top = payload["results"][0]["hits"][0]
    assert (top["id"], top["text"]) == ("s5", corpus[1][5]) and len(payload["results"][0]["hits"]) == 3
    result = runner.invoke(app, ["search", str(idx), corpus[1][5], "-k", "2"])
    assert result.exit_code == 0 and "  1. 1.0000  s5" in result.output
    result = runner.invoke(app, ["index", "info", str(idx)])
    assert result.exit_code == 0 and "120 x 64" in result.output
    result = runner.invoke(app, ["encode", str(STORIES), "--input", str(tmp_path / "missing.jsonl"), "--output",
                                 str(tmp_path / "x")])
    assert result.exit_code == 2 and "missing.jsonl does not exist" in result.output
    result = runner.invoke(app, ["index", "build", str(tmp_path / "x"), "--output", str(tmp_path / "y")])
    assert result.exit_code == 2 and "does not exist: run `embedkit encode` first" in result.output


def test_cli_encode_compile_flag_compiles_the_embedder(tmp_path, corpus, monkeypatch):
    calls = []
    monkeypatch.setattr(Embedder, "compile_layers", lambda self: calls.append(self) or self)  # compiling: test_embedder
    result = CliRunner().invoke(app, ["encode", str(STORIES), "--input", str(corpus[0]), "--output",
                                      str(tmp_path / "v"), "--dtype", "float32", "--max-length", "48", "--compile"])
    assert result.exit_code == 0, result.output
    assert len(calls) == 1 and f"{N_TEXTS} vectors" in result.output
