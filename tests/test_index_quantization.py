"""Compact indexes (int8, binary) hold sentence-transformers' codes; rescoring gives back exact top-k; Matryoshka
dimensions round trip through the vectors manifest, index.json and the query width; bad input is one line."""

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from embedkit import Embedder, Index
from embedkit.corpus import encode_corpus, open_vectors
from embedkit.corpus.manifest import write_vectors_folder
from embedkit.index import BuildOptions, build_faiss, build_index, choose_type, exact_knn
from embedkit.index.calibrate import RESCORE_DEPTHS, calibration_probes, recall
from embedkit.quantization import calibration_ranges, truncate_dimensions

REPO = Path(__file__).resolve().parent.parent
STORIES = REPO.parent / "shared" / "models" / "stories260K"
SENTENCES = REPO.parent / "shared" / "data" / "unlabeled" / "TinyStories" / "sentences.txt"
N_TEXTS = 100


@pytest.fixture(scope="module")
def embedder():
    return Embedder.from_pretrained(STORIES, dtype="float32", max_length=48)


@pytest.fixture(scope="module")
def texts():
    return SENTENCES.read_text(encoding="utf-8").splitlines()[:N_TEXTS]


@pytest.fixture(scope="module")
def vectors(tmp_path_factory, embedder, texts):
    folder = tmp_path_factory.mktemp("corpus")
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)),
                    encoding="utf-8")
    encode_corpus(embedder, [path], folder / "vectors", model_spec=STORIES, shard_size=40)
    return folder / "vectors"


def _unit(rows: int, dim: int = 40, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_int8_index_holds_sentence_transformers_codes_at_its_recorded_ranges(quantize_embeddings):
    x = _unit(500)
    index, info = build_faiss(x, BuildOptions(precision="int8"), "ip")
    assert (info["type"], info["factory"], info["precision"]) == ("int8_flat", "SQ8", "int8")
    ranges = np.asarray(info["ranges"], dtype=np.float32)
    np.testing.assert_array_equal(ranges, calibration_ranges(x))  # 500 rows: the whole set is the sample
    stored = faiss.vector_to_array(index.codes).reshape(500, 40)
    np.testing.assert_array_equal(stored, quantize_embeddings(x, precision="uint8", ranges=ranges))
    np.testing.assert_array_equal(stored.view(np.int8) ^ np.int8(-128),
                                  quantize_embeddings(x, precision="int8", calibration_embeddings=x))


@pytest.mark.parametrize("kind", ["binary_flat", "binary_hnsw"])
def test_binary_index_holds_sentence_transformers_bits(quantize_embeddings, kind):
    x = _unit(300, dim=37)
    plain = {"binary_threshold": "zero", "binary_rotation": False}  # the default centres and rotates first (compact.py)
    index, info = build_faiss(x, BuildOptions(index_type=kind, precision="binary", hnsw_m=8, **plain), "ip")
    assert info["rescore_multiplier"] == 20 and info["dimension"] == 37
    flat = index.index if kind == "binary_flat" else faiss.downcast_IndexBinary(index.index.storage)
    stored = faiss.vector_to_array(flat.xb).reshape(300, 5)
    np.testing.assert_array_equal(stored, quantize_embeddings(x, precision="ubinary"))
    np.testing.assert_array_equal(stored ^ 0x80, quantize_embeddings(x, precision="binary").view(np.uint8))
    scores, labels = index.search(x[:3], 1)
    assert labels[:, 0].tolist() == [0, 1, 2] and scores[:, 0].tolist() == [40.0] * 3  # bits - 2 * Hamming


def test_auto_picks_the_compact_type_of_the_precision():
    assert [choose_type(1000, 64, precision=p) for p in ("int8", "uint8", "float16", "binary", "ubinary")] == \
        ["int8_flat", "int8_flat", "fp16_flat", "binary_flat", "binary_flat"]
    assert choose_type(2_000_000, 64, precision="binary") == "binary_hnsw"


@pytest.mark.parametrize("precision", ["binary", "int8"])
def test_rescoring_returns_the_float_index_exact_top_k(vectors, tmp_path, embedder, texts, precision):
    float_index = Index.load(build_index(vectors, tmp_path / "flat", BuildOptions(index_type="flat")).output)
    built = build_index(vectors, tmp_path / precision, BuildOptions(precision=precision))
    assert built.info["bytes_per_vector"] < float_index.info["bytes_per_vector"] / (20 if precision == "binary" else 3)
    index = Index.load(built.output)
    queries = embedder.encode(texts[:8], instruction=embedder.config.query_instruction)
    exact = float_index.search(queries, 10)
    rescored = index.search(queries, 10, rescore_multiplier=10)  # 10 x 10 candidates = the whole corpus
    for want, got in zip(exact, rescored, strict=True):
        assert [h.id for h in got] == [h.id for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
    by_text = index.search(texts[:2], 10, rescore_multiplier=10)
    assert [[h.id for h in hits] for hits in by_text] == [[h.id for h in hits] for hits in float_index.search(
        texts[:2], 10)]
    compact = index.search(queries, 10, rescore_multiplier=0)  # the codes' own ranking: mostly the same
    overlap = np.mean([len({h.id for h in a} & {h.id for h in b}) / 10 for a, b in zip(compact, exact, strict=True)])
    assert 0.3 <= overlap <= 1.0
    default = index.search(queries, 10)  # binary: rescores 20 x k by default; int8: off
    expected = index.search(queries, 10, rescore_multiplier=20) if precision == "binary" else compact
    assert [[h.id for h in hits] for hits in default] == [[h.id for h in hits] for hits in expected]


def test_rescoring_from_an_int8_vectors_folder_and_int8_index_reuses_its_codes(tmp_path, embedder, vectors, texts):
    corpus = Path(open_vectors(vectors).manifest["inputs"][0]["path"])
    encode_corpus(embedder, [corpus], tmp_path / "v8", precision="int8", shard_size=40)
    vset = open_vectors(tmp_path / "v8")
    built = build_index(tmp_path / "v8", tmp_path / "i8", BuildOptions(precision="int8"))
    np.testing.assert_array_equal(np.asarray(built.info["ranges"], dtype=np.float32), vset.ranges)
    codes = np.concatenate([c for _, c in vset.iter_shards()])
    index = Index.load(built.output)
    stored = faiss.vector_to_array(index.faiss.codes).reshape(codes.shape)
    np.testing.assert_array_equal(stored.view(np.int8) ^ np.int8(-128), codes)
    binary = Index.load(build_index(tmp_path / "v8", tmp_path / "b", BuildOptions(precision="binary")).output)
    queries = embedder.encode(texts[:4], instruction=embedder.config.query_instruction)
    got = binary.search(queries, 5, rescore_multiplier=20)  # rescored with the int8 rows read back
    scores, positions = exact_knn(vset.load(), queries, 5, "ip")
    assert [[h.position for h in hits] for hits in got] == positions.tolist()
    np.testing.assert_allclose([[h.score for h in hits] for hits in got], scores, atol=1e-5)


def test_dimensions_round_trip_through_manifest_index_and_query_width(vectors, tmp_path, embedder, texts):
    built = build_index(vectors, tmp_path / "d24", BuildOptions(index_type="flat", dimensions=24))
    info = built.info
    assert (info["dimension"], info["source_dimension"], info["model_dimension"]) == (24, 64, 64)
    assert info["options"]["dimensions"] == 24 and "precision" not in info["options"]
    index = Index.load(built.output)
    docs = truncate_dimensions(open_vectors(vectors).load(), 24)
    query = embedder.encode(texts[:3], instruction=embedder.config.query_instruction, dimensions=24)
    scores, positions = exact_knn(docs, query, 5, "ip")
    for hits in (index.search(texts[:3], 5),  # text queries are encoded at the index's width
                 index.search(embedder.encode(texts[:3], instruction=embedder.config.query_instruction), 5)):
        assert [[h.position for h in row] for row in hits] == positions.tolist()
        np.testing.assert_allclose([[h.score for h in row] for row in hits], scores, atol=1e-5)
    assert build_index(vectors, tmp_path / "d24", BuildOptions(index_type="flat", dimensions=24)).up_to_date

    corpus = Path(open_vectors(vectors).manifest["inputs"][0]["path"])
    encode_corpus(embedder, [corpus], tmp_path / "v24", dimensions=24, shard_size=40)
    cut = build_index(tmp_path / "v24", tmp_path / "i24", BuildOptions(precision="binary")).info
    assert (cut["dimension"], cut["source_dimension"], cut["model_dimension"]) == (24, 24, 64)
    hits = Index.load(tmp_path / "i24").search(texts[:3], 5, rescore_multiplier=20)
    np.testing.assert_allclose([[h.score for h in row] for row in hits], scores, atol=1e-4)


def test_bad_input_is_one_line(vectors, tmp_path):
    with pytest.raises(ValueError, match=r"^precision must be one of float32, float16, int8, uint8, binary, ubinary,"
                                         r" got 'int4'\.$"):
        BuildOptions(precision="int4")
    with pytest.raises(ValueError, match=r"^dimensions must be at least 1, got 0: "):
        BuildOptions(dimensions=0)
    with pytest.raises(ValueError, match=r"^Index type hnsw stores float32 vectors, not binary: use --type auto or "
                                         r"one of: binary_flat, binary_hnsw\.$"):
        BuildOptions(index_type="hnsw", precision="binary")
    with pytest.raises(ValueError, match=r"^dimensions must be between 1 and 64, got 65: "):
        build_index(vectors, tmp_path / "x", BuildOptions(dimensions=65))
    index = Index.load(build_index(vectors, tmp_path / "b", BuildOptions(precision="binary")).output)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"^rescore_multiplier \(--rescore-multiplier\) must be an integer of at "
                                             rf"least 0 \(0 = no rescoring\), got {bad!r}\.$"):
            index.search(np.ones((1, 64), dtype=np.float32), 3, rescore_multiplier=bad)


def test_cli_precision_dimensions_and_rescore_multiplier(tmp_path, vectors, texts):
    from typer.testing import CliRunner  # noqa: PLC0415

    from embedkit.cli import app  # noqa: PLC0415

    runner = CliRunner()
    corpus = open_vectors(vectors).manifest["inputs"][0]["path"]
    out, idx = tmp_path / "v", tmp_path / "i"
    result = runner.invoke(app, ["encode", str(STORIES), "--input", corpus, "--output", str(out), "--dtype",
                                 "float32", "--max-length", "48", "--dimensions", "32", "--precision", "int8"])
    assert result.exit_code == 0, result.output
    manifest = open_vectors(out).manifest
    assert (manifest["dimension"], manifest["precision"], len(manifest["ranges"][0])) == (32, "int8", 32)
    result = runner.invoke(app, ["index", "build", str(out), "--output", str(idx), "--precision", "binary",
                                 "--dimensions", "16"])
    assert result.exit_code == 0 and "binary_flat (BFlat, ip) over 100 vectors x 16" in result.output, result.output
    assert "; rescoring 20 x k gives recall@10 1.000 on 100 corpus probes;" in result.output, result.output
    result = runner.invoke(app, ["index", "info", str(idx)])
    assert result.exit_code == 0 and "binary, 2.33 bytes per vector, rescoring 20 x k" in result.output, result.output
    assert "recall@10  1.000 rescored 20 x k on 100 corpus probes" in result.output  # 200 candidates: all 100 rows
    result = runner.invoke(app, ["search", str(idx), texts[5], "-k", "3", "--json", "--rescore-multiplier", "40"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["hits"][0]["id"] == "d5"
    for args, message in (
        (["search", str(idx), "q", "--rescore-multiplier", "-1"], "rescore_multiplier (--rescore-multiplier) must"),
        (["index", "build", str(out), "--output", str(tmp_path / "x"), "--dimensions", "33"],
         "dimensions must be between 1 and 32, got 33"),
        (["index", "build", str(out), "--output", str(tmp_path / "x"), "--precision", "int4"],
         "precision must be one of float32"),
        (["encode", str(STORIES), "--input", corpus, "--output", str(tmp_path / "x"), "--dimensions", "0"],
         "dimensions must be at least 1, got 0"),
        (["encode", str(STORIES), "--input", corpus, "--output", str(tmp_path / "x"), "--dimensions", "65"],
         "dimensions must be between 1 and 64, got 65"),
    ):
        result = runner.invoke(app, args)
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1 and message in errors[0], result.output
        assert "Traceback" not in result.output


def test_binary_rescoring_depth_is_the_smallest_that_reaches_the_target_recall(tmp_path):
    """index.json's rescoring depth is calibrated from the type's least depth (20) up, and searching the probes
    through ``Index.search_vectors`` gives the recall calibration recorded (the two share one search path)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((20, 32))[rng.integers(0, 20, 2000)] + rng.standard_normal((2000, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    folder = write_vectors_folder(tmp_path / "v", x)
    queries, truth = calibration_probes(x, "ip")
    depths = {}
    for target in (0.5, 0.95):
        built = build_index(folder, tmp_path / f"i{target}", BuildOptions(precision="binary", target_recall=target),
                            texts=False)
        curve = built.info["calibration"]["rescore_curve"]
        depths[target] = built.info["rescore_multiplier"]
        assert [depth for depth, _ in curve] == [d for d in RESCORE_DEPTHS if d >= 20][:len(curve)]  # 20: the floor
        assert curve[-1][0] == depths[target]
        assert all(reached < target for _, reached in curve[:-1]) and curve[-1][1] >= target
        _, found = Index.load(built.output).search_vectors(queries, 10)  # the index's own depth
        assert recall(found, truth) == curve[-1][1]
    assert depths == {0.5: 20, 0.95: 50}  # the binary types' least depth, and past it where the probes need it


def test_binary_hnsw_calibrates_efsearch_on_rescored_recall(tmp_path):
    """A rescoring type's knob is measured as it searches, rescored at the least depth: below k x 20 candidates
    efSearch is raised to them, so every such step scores the same and the cheapest one is kept."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((20, 32))[rng.integers(0, 20, 2000)] + rng.standard_normal((2000, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    built = build_index(write_vectors_folder(tmp_path / "v", x), tmp_path / "i",
                        BuildOptions(index_type="binary_hnsw", precision="binary", hnsw_m=8, target_recall=0.5),
                        texts=False)
    calibration = built.info["calibration"]
    first, *_ = calibration["curve"]
    assert first[0]["efSearch"] < 200 and first[1] == calibration["rescore_curve"][0][1] >= 0.5
    assert built.info["search"] == first[0] and built.info["rescore_multiplier"] == 20
