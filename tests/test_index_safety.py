"""Index folders that fail safely (issue 15, items 2.2, 2.6, 2.7, 2.8, 2.9): corruption of the same size is
detected, bad numeric options are refused before FAISS sees them, ids round-trip exactly, pickled files are
refused by name, and temporary folders of killed builds are removed (never a live one)."""

import fcntl
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from embedkit import Embedder, Index
from embedkit.cli import app
from embedkit.corpus import encode_corpus
from embedkit.index import BuildOptions, build_index
from embedkit.index.folder import file_facts, index_problem, sample_digest, write_ids

REPO = Path(__file__).resolve().parent.parent
STORIES = REPO.parent / "shared" / "models" / "stories260K"
SENTENCES = REPO.parent / "shared" / "data" / "unlabeled" / "TinyStories" / "sentences.txt"
OLD_FOLDER = Path(__file__).resolve().parent / "fixtures" / "index-v1-flat"  # written by embedkit before this fix
N = 40


@pytest.fixture(scope="module")
def embedder():
    return Embedder.from_pretrained(STORIES, dtype="float32", max_length=48)


@pytest.fixture(scope="module")
def vectors(tmp_path_factory, embedder):
    folder = tmp_path_factory.mktemp("corpus")
    texts = SENTENCES.read_text(encoding="utf-8").splitlines()[:N]
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps({"_id": f"s{i}", "text": t}) + "\n" for i, t in enumerate(texts)),
                    encoding="utf-8")
    encode_corpus(embedder, [path], folder / "vectors", model_spec=STORIES, shard_size=20)
    return folder / "vectors"


@pytest.fixture(scope="module")
def flat(tmp_path_factory, vectors):
    out = tmp_path_factory.mktemp("idx") / "flat"
    build_index(vectors, out, BuildOptions(index_type="flat"))
    return out


@pytest.fixture
def copy(flat, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(flat, out)
    return out


def zero_row(folder: Path, position: int) -> None:
    """Zero one vector inside index.faiss in place (same size): find its float32 bytes in the file."""
    index = Index.load(folder)
    row = index.faiss.reconstruct(position).astype(np.float32).tobytes()
    data = bytearray((folder / "index.faiss").read_bytes())
    at = data.find(row)
    assert at > 0
    data[at:at + len(row)] = bytes(len(row))
    (folder / "index.faiss").write_bytes(bytes(data))


def swap_ids(folder: Path, a: int, b: int) -> None:
    """Swap two same-length ids in ids.utf8.npy in place (same size)."""
    offsets = np.load(folder / "ids.offsets.npy")
    data = np.load(folder / "ids.utf8.npy").copy()
    (sa, ea), (sb, eb) = (offsets[a], offsets[a + 1]), (offsets[b], offsets[b + 1])
    assert ea - sa == eb - sb
    data[sa:ea], data[sb:eb] = data[sb:eb].copy(), data[sa:ea].copy()
    with open(folder / "ids.utf8.npy", "wb") as handle:
        np.save(handle, data)


# -- 2.2 same-size corruption ------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["zeroed vector", "swapped ids"])
def test_same_size_corruption_is_detected_on_load_verify_and_rebuild(vectors, copy, damage):
    size = (copy / "index.faiss").stat().st_size
    if damage == "zeroed vector":
        zero_row(copy, 7)
        bad = "index.faiss"
    else:
        swap_ids(copy, 3, 4)  # "s3" <-> "s4"
        bad = "ids.utf8.npy"
    assert (copy / "index.faiss").stat().st_size == size
    with pytest.raises(ValueError, match=rf"Index .* is damaged: .*{bad} is corrupt .*Rebuild it"):
        Index.load(copy)  # the default sampled check (these files are small: hashed whole)
    with pytest.raises(ValueError, match=rf"{bad} is corrupt \(sha256 mismatch"):
        Index.load(copy, verify=True)
    result = CliRunner().invoke(app, ["index", "verify", str(copy)])
    assert result.exit_code == 2 and bad in result.output and "is corrupt" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(app, ["search", str(copy), "a dog", "--verify"])
    assert result.exit_code == 2 and bad in result.output
    rebuilt = build_index(vectors, copy, BuildOptions(index_type="flat"))  # not "up to date": rebuilt
    assert not rebuilt.up_to_date
    assert build_index(vectors, copy, BuildOptions(index_type="flat")).up_to_date
    index = Index.load(copy, verify=True)
    assert [index.id_at(p) for p in (3, 4)] == ["s3", "s4"]
    assert index.search(index.faiss.reconstruct_n(7, 1), k=1)[0][0].id == "s7"


def test_index_verify_passes_a_sound_index(flat):
    result = CliRunner().invoke(app, ["index", "verify", str(flat)])
    assert result.exit_code == 0 and "OK:" in result.output and "files match their sha256" in result.output


def test_sampled_check_covers_header_and_blocks_and_full_check_every_byte(tmp_path):
    path = tmp_path / "big.bin"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 10 << 20, dtype=np.uint8).tobytes())
    path.write_bytes(bytes(data))
    info = {"files": file_facts(tmp_path)}
    assert info["files"]["big.bin"]["sample_sha256"].startswith("sample:")
    assert index_problem(tmp_path, info, "sample") is None
    data[100] ^= 1  # inside the first MiB: sampled
    path.write_bytes(bytes(data))
    assert "sampled blocks" in index_problem(tmp_path, info, "sample")
    data[100] ^= 1
    gap = (len(data) - (64 << 10)) * 10 // 47 + (64 << 10) + 1000  # past the 11th of 48 spread blocks: not sampled
    data[gap] ^= 1
    path.write_bytes(bytes(data))
    assert index_problem(tmp_path, info, "sample") is None  # the documented price of the cheap check
    assert "sha256 mismatch" in index_problem(tmp_path, info, "full")
    assert sample_digest(path) == info["files"]["big.bin"]["sample_sha256"]


# -- 2.6 numeric options ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("option", "value", "message"), [
    ("hnsw_m", 0, r"hnsw_m \(--hnsw-m\) must be an integer from 2 to 1024, got 0\."),
    ("ef_construction", -1, r"ef_construction \(--ef-construction\) must be an integer from 1 to \d+, got -1\."),
    ("nlist", 0, r"nlist \(--nlist\) must be an integer from 1 to \d+, got 0\."),
    ("train_size", 0, r"train_size \(--train-size\) must be an integer from 1"),
    ("pq_m", -2, r"pq_m \(--pq-m\) must be an integer from 1"),
    ("hnsw_m", True, r"hnsw_m \(--hnsw-m\) must be an integer"),
    ("seed", -1, r"seed \(--seed\) must be an integer from 0"),
])
def test_bad_build_options_are_refused_before_faiss(option, value, message):
    with pytest.raises(ValueError, match=message):
        BuildOptions(**{option: value})


def test_training_sample_must_fit_the_corpus_and_the_lists(vectors, tmp_path):
    with pytest.raises(ValueError, match=r"train_size=500 is more than the 40 vectors: lower --train-size\."):
        build_index(vectors, tmp_path / "a", BuildOptions(index_type="ivf", nlist=2, train_size=500))
    with pytest.raises(ValueError, match=r"train_size=3 is less than nlist=4: IVF needs at least one training"):
        build_index(vectors, tmp_path / "b", BuildOptions(index_type="ivf", nlist=4, train_size=3))
    assert not any(p.name.startswith((".a.", ".b.")) for p in tmp_path.iterdir())


@pytest.mark.parametrize("args", [["--type", "hnsw", "--hnsw-m", "0"], ["--nlist", "0"],
                                  ["--type", "hnsw", "--ef-construction", "-1"]])
def test_cli_build_refuses_bad_numbers_in_one_line_and_leaves_nothing(vectors, tmp_path, args):
    result = CliRunner().invoke(app, ["index", "build", str(vectors), "--output", str(tmp_path / "i"), *args])
    assert result.exit_code == 2, result.output
    assert "must be an integer" in result.output and len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no index, no temporary folder


@pytest.mark.parametrize(("option", "value"), [("--nprobe", "0"), ("--k-factor", "0"), ("--ef-search", "-5")])
def test_cli_search_refuses_bad_settings_in_one_line(flat, option, value):
    result = CliRunner().invoke(app, ["search", str(flat), "a dog", option, value])
    assert result.exit_code == 2, result.output
    keyword = option[2:].replace("-", "_")
    assert f"{keyword} ({option}) must be an integer from 1 to" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_search_settings_are_checked_by_the_api_too(flat):
    index = Index.load(flat)
    query = index.faiss.reconstruct_n(0, 1)
    for bad in ({"ef_search": -5}, {"nprobe": 0}, {"k_factor": 0}, {"nprobe": 2.5}):
        with pytest.raises(ValueError, match="must be an integer from 1"):
            index.search(query, k=2, **bad)
    with pytest.raises(TypeError, match="Unknown search setting 'n_probe'"):
        index.search(query, k=2, n_probe=3)
    assert index.search(query, k=2, nprobe=3)[0][0].id == "s0"  # a setting the type lacks is ignored


# -- 2.7 ids -----------------------------------------------------------------------------------------------------
def test_ids_round_trip_exactly_and_cost_only_their_bytes(tmp_path, embedder):
    ids = ["k", "k\u0000", "x" * 5000, "é\t", *(f"r{i}" for i in range(40))]
    path = tmp_path / "c.jsonl"
    texts = SENTENCES.read_text(encoding="utf-8").splitlines()[:len(ids)]
    path.write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in zip(ids, texts, strict=True)),
                    encoding="utf-8")
    encode_corpus(embedder, [path], tmp_path / "v")
    build_index(tmp_path / "v", tmp_path / "i", BuildOptions(index_type="flat"))
    index = Index.load(tmp_path / "i")
    assert [index.id_at(p) for p in range(len(ids))] == ids
    hits = index.search(index.faiss.reconstruct_n(0, 2), k=1)
    assert [h[0].id for h in hits] == ["k", "k\u0000"] and hits[1][0].text == texts[1]
    id_bytes = sum((tmp_path / "i" / name).stat().st_size for name in ("ids.utf8.npy", "ids.offsets.npy"))
    assert id_bytes < 5000 + 10 * len(ids) + 400  # was 5,000 bytes per row in one fixed-width array
    assert not (tmp_path / "i" / "ids.npy").exists()


def test_repeated_ids_are_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"Id 'a' appears twice in the vectors folder: ids must be unique\."):
        write_ids(tmp_path, ["a", "b", "a"])


def test_an_index_folder_written_before_the_offsets_layout_still_loads(tmp_path):
    old = tmp_path / "old"
    shutil.copytree(OLD_FOLDER, old)
    assert (old / "ids.npy").is_file() and "sample_sha256" not in json.loads((old / "index.json").read_text())["files"]
    index = Index.load(old, verify=True)
    assert [index.id_at(p) for p in range(3)] == ["k", "doc-ä", "x" * 40]
    hits = index.search(index.faiss.reconstruct_n(0, 3), k=3)
    assert [[h.id for h in row] for row in hits] == [["k", "s11", "s3"], ["doc-ä", "s6", "s4"],
                                                     ["x" * 40, "s6", "doc-ä"]]
    assert hits[0][0].text.startswith(index.text_at(0)[:10])
    swapped = bytearray((old / "ids.npy").read_bytes())
    swapped[-1] ^= 1  # a same-size change of an old folder's ids: its small files are hashed whole
    (old / "ids.npy").write_bytes(bytes(swapped))
    with pytest.raises(ValueError, match=r"ids\.npy is corrupt"):
        Index.load(old)


# -- 2.8 pickled .npy ---------------------------------------------------------------------------------------------
def test_a_pickled_npy_is_refused_by_name(copy):
    target = copy / "ids.offsets.npy"
    with open(target, "wb") as handle:
        np.save(handle, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    info = json.loads((copy / "index.json").read_text())
    info["files"] = file_facts(copy)  # a folder whose checksums were made to match
    (copy / "index.json").unlink()
    info["files"].pop("index.json", None)
    (copy / "index.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"ids\.offsets\.npy is not a plain numeric \.npy array .*embedkit never "
                                         r"unpickles: rebuild the index with `embedkit index build`\.") as err:
        Index.load(copy)
    assert "\n" not in str(err.value)


# -- 2.9 temporary folders of killed builds -----------------------------------------------------------------------
def test_stale_temporary_build_folders_are_removed_but_never_a_live_one(vectors, tmp_path):
    out = tmp_path / "idx"
    old = time.time() - 3600
    stale, live, fresh = (tmp_path / f".idx.{name}" for name in ("dead0001", "live0001", "new00001"))
    other = tmp_path / ".idx2.dead0002"  # another output's
    for folder in (stale, live, fresh, other):
        folder.mkdir()
        (folder / "index.faiss").write_bytes(b"half")
    for folder in (stale, live, other):
        os.utime(folder, (old, old))
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a concurrent build still writing it
    try:
        build_index(vectors, out, BuildOptions(index_type="flat"))
    finally:
        os.close(fd)
    assert not stale.exists()
    assert live.exists() and fresh.exists() and other.exists()  # locked; newer than this process; not ours
    assert Index.load(out, verify=True).info["count"] == N
