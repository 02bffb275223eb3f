"""Binary index transforms (issue 14): the bits are sentence-transformers' of ``(x - t) @ R``, ``t`` the corpus mean or
median per dimension (calibrated on a sample, saved in index.json) and ``R`` a seeded random rotation, so anisotropic
vectors (a big shared offset) still get bits that split the corpus; folders from before them load and search as
``x > 0``; bad input is one line."""

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from embedkit import Embedder, Index
from embedkit.corpus import encode_corpus
from embedkit.corpus.manifest import write_vectors_folder
from embedkit.index import BuildOptions, build_faiss, build_index, exact_knn
from embedkit.index.compact import DEFAULT_BINARY_THRESHOLD
from embedkit.quantization import binary_thresholds, random_rotation

REPO = Path(__file__).resolve().parent.parent
STORIES = REPO.parent / "shared" / "models" / "stories260K"
SENTENCES = REPO.parent / "shared" / "data" / "unlabeled" / "TinyStories" / "sentences.txt"
OLD_BINARY = Path(__file__).resolve().parent / "fixtures" / "index-v1-binary"  # index/ built from vectors/ by embedkit
# before binary transforms (commit 2826c8a), from anisotropic(clusters=6) below


def anisotropic(clusters: int = 30, per: int = 10, d: int = 48, queries: int = 20, seed: int = 0):
    """Unit rows = 8 x one shared offset + a cluster centre + noise (like LLM embeddings: a large mean component
    on top of a small signal); queries are drawn like documents. Each query's true top-10 is its own cluster."""
    rng = np.random.default_rng(seed)
    offset = 8 * rng.standard_normal(d).astype(np.float32)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    docs = offset + centres.repeat(per, 0) + 0.3 * rng.standard_normal((clusters * per, d)).astype(np.float32)
    asks = offset + centres[rng.integers(0, clusters, queries)] + 0.3 * rng.standard_normal((queries, d)).astype(
        np.float32)
    unit = lambda rows: (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return unit(docs), unit(asks)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist(),
                                                                         strict=True)]))


@pytest.mark.parametrize("name", ["mean", "median"])
def test_thresholds_are_calibrated_and_the_bits_are_sentence_transformers_of_x_minus_t(quantize_embeddings, name):
    x, _ = anisotropic()
    options = BuildOptions(precision="binary", binary_threshold=name, binary_rotation=False)
    index, info = build_faiss(x, options, "ip")
    expected = (x.mean(axis=0) if name == "mean" else np.median(x, axis=0)).astype(np.float32)  # 300 rows: all
    np.testing.assert_array_equal(np.asarray(info["thresholds"], dtype=np.float32), expected)
    assert (info["binary_threshold"], info["binary_rotation"]) == (name, None)
    assert (info["options"]["binary_threshold"], info["options"]["binary_rotation"]) == (name, False)
    stored = faiss.vector_to_array(index.index.xb).reshape(300, 6)
    np.testing.assert_array_equal(stored, quantize_embeddings(x - expected, precision="ubinary"))
    if name == "median":  # each bit splits the corpus in two
        assert np.abs(np.unpackbits(stored, axis=1).mean(axis=0) - 0.5).max() <= 0.01
    sample = BuildOptions(precision="binary", binary_threshold=name, train_size=50, seed=3)
    _, small = build_faiss(x, sample, "ip")
    rows = np.sort(np.random.default_rng(3).choice(300, size=50, replace=False))
    np.testing.assert_array_equal(np.asarray(small["thresholds"], dtype=np.float32), binary_thresholds(x[rows], name))


def test_the_default_centres_and_rotates_with_a_rotation_drawn_from_the_seed(quantize_embeddings):
    x, _ = anisotropic()
    index, info = build_faiss(x, BuildOptions(precision="binary", seed=5), "ip")
    rotation = random_rotation(48, 5)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(48), atol=1e-5)
    np.testing.assert_array_equal(rotation, random_rotation(48, 5))
    assert (info["binary_threshold"], info["binary_rotation"]["seed"]) == (DEFAULT_BINARY_THRESHOLD, 5) == ("mean", 5)
    assert info["binary_rotation"]["probe"] == rotation[0, :8].tolist()
    assert (info["options"]["binary_threshold"], info["options"]["binary_rotation"]) == (None, None)  # unset
    stored = np.unpackbits(faiss.vector_to_array(index.index.xb).reshape(300, 6), axis=1)[:, :48]
    rotated = (x - x.mean(axis=0)) @ rotation
    clear = np.abs(rotated) > 1e-5  # FAISS's matrix product rounds otherwise than numpy's: bits at ~0 may differ
    assert clear.mean() > 0.99
    expected = np.unpackbits(quantize_embeddings(rotated, precision="ubinary"), axis=1)[:, :48]
    np.testing.assert_array_equal(stored[clear], expected[clear])


def test_zero_threshold_without_rotation_is_sentence_transformers_own_bits(quantize_embeddings):
    x, _ = anisotropic()
    options = BuildOptions(precision="ubinary", binary_threshold="zero", binary_rotation=False)
    index, info = build_faiss(x, options, "ip")
    assert (info["binary_threshold"], info["binary_rotation"]) == ("zero", None) and "thresholds" not in info
    assert not {"binary_threshold", "binary_rotation"} & set(info["options"])  # saved as folders from before them
    stored = faiss.vector_to_array(index.index.xb).reshape(300, 6)
    np.testing.assert_array_equal(stored, quantize_embeddings(x, precision="ubinary"))


def test_calibrated_bits_recover_the_float_top_k_where_zero_bits_do_not(tmp_path):
    x, queries = anisotropic()
    _, truth = exact_knn(x, queries, 10, "ip")
    vectors = write_vectors_folder(tmp_path / "vectors", x)
    found = {}
    for name, rotate in (("zero", False), ("mean", False), ("median", False), ("mean", True), ("zero", True)):
        options = BuildOptions(precision="binary", binary_threshold=name, binary_rotation=rotate)
        built = build_index(vectors, tmp_path / f"{name}-{rotate}", options, texts=False)
        index = Index.load(built.output)  # the transform comes back from index.json
        if name != "zero":
            np.testing.assert_array_equal(index.faiss.thresholds, np.asarray(built.info["thresholds"], np.float32))
        assert (index.faiss.rotation is not None) == rotate
        found[name, rotate] = {m: index.search_vectors(queries, 10, rescore_multiplier=m)[1] for m in (0, 4)}
    # zero: ~96 % of the bits are the offset's signs, the same in every document; 4 x k candidates miss a quarter
    assert _recall(found["zero", False][4], truth) <= 0.8
    for key in (("mean", False), ("median", False), ("mean", True)):  # each query's cluster is in its 40 nearest
        assert found[key][4].tolist() == truth.tolist(), key  # codes: the exact top-10
        assert _recall(found[key][0], truth) >= 0.95 > _recall(found["zero", False][0], truth) + 0.3
    # a rotation alone spreads the offset over every bit instead of removing it: better than zero, not exact
    assert _recall(found["zero", False][4], truth) < _recall(found["zero", True][4], truth) < 1.0


def test_an_index_folder_from_before_thresholds_loads_and_searches_with_zero_bits(tmp_path, quantize_embeddings):
    shutil.copytree(OLD_BINARY, tmp_path / "old")
    folder, vectors = tmp_path / "old" / "index", tmp_path / "old" / "vectors"
    info = json.loads((folder / "index.json").read_text())
    assert not {"binary_threshold", "binary_rotation"} & (set(info) | set(info["options"]))
    info["vectors_dir"] = str(vectors)  # the fixture's copy of the folder it was built from
    (folder / "index.json").write_text(json.dumps(info))
    index = Index.load(folder, verify=True)
    assert index.faiss.thresholds is None and index.faiss.rotation is None
    x = np.load(vectors / "shards" / "shard-00000.npy")
    queries = x[:5] + 0.01
    codes = quantize_embeddings(x, precision="ubinary")
    hamming = np.unpackbits(quantize_embeddings(queries, precision="ubinary")[:, None] ^ codes[None], axis=2).sum(2)
    scores, _ = index.search_vectors(queries, 3, rescore_multiplier=0)
    np.testing.assert_array_equal(scores, x.shape[1] - 2 * np.sort(hamming, axis=1)[:, :3])
    _, exact = exact_knn(x, queries, 3, "ip")
    assert index.search_vectors(queries, 3, rescore_multiplier=100)[1].tolist() == exact.tolist()
    zero = BuildOptions(precision="binary", binary_threshold="zero", binary_rotation=False)
    assert build_index(vectors, folder, zero, texts=False).up_to_date  # the options it was built with
    rebuilt = build_index(vectors, folder, BuildOptions(precision="binary"), texts=False)  # the new default
    assert not rebuilt.up_to_date and rebuilt.info["binary_threshold"] == DEFAULT_BINARY_THRESHOLD


def test_a_rotation_drawn_differently_on_load_is_refused(tmp_path):
    x, _ = anisotropic()
    built = build_index(write_vectors_folder(tmp_path / "v", x), tmp_path / "i", BuildOptions(precision="binary"),
                        texts=False)
    info = json.loads((built.output / "index.json").read_text())
    info["binary_rotation"]["probe"][3] += 1e-3
    (built.output / "index.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"^This machine draws another rotation from seed 0 than the one the binary "
                                         r"index was built with: rebuild the index here\.$"):
        Index.load(built.output)


def test_bad_transform_input_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"^binary_threshold must be one of zero, mean, median, got 'mode'\.$"):
        BuildOptions(precision="binary", binary_threshold="mode")
    with pytest.raises(ValueError, match=r"^binary_rotation must be true or false, got 'yes'\.$"):
        BuildOptions(precision="binary", binary_rotation="yes")
    for name, value in (("binary_threshold", "mean"), ("binary_rotation", True)):
        with pytest.raises(ValueError, match=rf"^{name} applies to binary and ubinary indexes, not int8: drop it, or "
                                             r"build with --precision binary\.$"):
            BuildOptions(precision="int8", **{name: value})
    corpus = tmp_path / "corpus.jsonl"
    texts = SENTENCES.read_text(encoding="utf-8").splitlines()[:20]
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    embedder = Embedder.from_pretrained(STORIES, dtype="float32", max_length=32)
    encode_corpus(embedder, [corpus], tmp_path / "bits", precision="binary")  # x > 0 codes, 8 bytes each
    for asked, options in (("binary_threshold median", {"binary_threshold": "median"}),
                           ("binary_rotation", {"binary_rotation": True})):
        with pytest.raises(ValueError, match=rf"^{asked} needs float or int8 vectors, but .*bits holds binary codes "
                                             r"\(their bits are x > 0 already\): encode with another --precision, or "
                                             r"use binary_threshold zero without binary_rotation\.$"):
            build_index(tmp_path / "bits", tmp_path / "i", BuildOptions(precision="binary", **options))
    built = build_index(tmp_path / "bits", tmp_path / "i", BuildOptions(precision="binary"))
    assert (built.info["binary_threshold"], built.info["binary_rotation"]) == ("zero", None)  # the bits as they are


def test_cli_builds_and_shows_the_transform_and_refuses_a_bad_one_in_one_line(tmp_path):
    from typer.testing import CliRunner  # noqa: PLC0415

    from embedkit.cli import app  # noqa: PLC0415

    runner = CliRunner()
    vectors = write_vectors_folder(tmp_path / "v", anisotropic()[0])
    for args, bits in (([], "(x - mean) @ R > 0 (R: random rotation, seed 0)"),
                       (["--binary-threshold", "median", "--no-binary-rotation"], "x - median > 0"),
                       (["--binary-threshold", "zero", "--no-binary-rotation"], "x > 0")):
        out = tmp_path / f"i{len(args)}{args[1] if args else ''}"
        result = runner.invoke(app, ["index", "build", str(vectors), "--output", str(out), "--precision", "binary",
                                     "--no-texts", *args])
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["index", "info", str(out)])
        assert result.exit_code == 0 and f"\nbits       {bits}\n" in result.output, result.output
    result = runner.invoke(app, ["index", "build", str(vectors), "--output", str(tmp_path / "x"), "--precision",
                                 "binary", "--binary-threshold", "mode"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and errors == ["error: binary_threshold must be one of zero, mean, median, got "
                                                "'mode'."], result.output
    result = runner.invoke(app, ["index", "info", str(OLD_BINARY / "index")])
    assert result.exit_code == 0 and "\nbits       x > 0\n" in result.output, result.output
