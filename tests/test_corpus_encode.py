"""`encode_corpus`: vectors equal in-memory encoding; manifest; resume after kill -9; refusal of changed jobs;
bad input (empty texts, repeated ids, corrupt or missing shards)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from embedkit import Embedder
from embedkit.corpus import ReaderOptions, encode_corpus, open_vectors
from embedkit.io import sha256_file

REPO = Path(__file__).resolve().parent.parent
STORIES = REPO.parent / "shared" / "models" / "stories260K"
SENTENCES = REPO.parent / "shared" / "data" / "unlabeled" / "TinyStories" / "sentences.txt"


@pytest.fixture(scope="module")
def embedder():
    return Embedder.from_pretrained(STORIES, dtype="float32", max_length=48)


@pytest.fixture(scope="module")
def texts():
    return SENTENCES.read_text(encoding="utf-8").splitlines()[:45]


def _corpus(folder: Path, texts, name="corpus.jsonl") -> Path:
    path = folder / name
    path.write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                            for i, t in enumerate(texts)), encoding="utf-8")
    return path


def _checksums(folder: Path) -> list:
    return [(s["count"], s["sha256"]) for s in json.loads((folder / "manifest.json").read_text())["shards"]]


def test_vectors_equal_in_memory_encode_and_manifest_is_complete(tmp_path, embedder, texts):
    corpus = _corpus(tmp_path, texts)
    result = encode_corpus(embedder, [corpus], tmp_path / "out", model_spec=STORIES, shard_size=16)
    assert result.complete and not result.already_complete
    assert result.shards_written == [0, 1, 2] and result.count == 45
    vset = open_vectors(tmp_path / "out")
    assert vset.ids() == [f"d{i}" for i in range(45)]
    np.testing.assert_allclose(vset.load(), embedder.encode(texts), atol=2e-5)
    m = vset.manifest
    facts = (m["dimension"], m["dtype"], m["normalized"], m["metric"], m["pooling"])
    assert facts == (64, "float32", True, "ip", "mean")
    assert m["model"]["fingerprint"] == embedder.fingerprint()
    assert m["model"]["spec"] == str(STORIES.resolve())
    assert [s["count"] for s in m["shards"]] == [16, 16, 13] and m["rows"] == 45
    assert m["inputs"][0]["sha256"] == sha256_file(corpus)
    for shard in m["shards"]:
        assert sha256_file(tmp_path / "out" / "shards" / shard["vectors"]) == shard["sha256"]["vectors"]
        assert np.load(tmp_path / "out" / "shards" / shard["vectors"], mmap_mode="r").shape == (shard["count"], 64)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    again = encode_corpus(embedder, [corpus], tmp_path / "out", model_spec=STORIES, shard_size=16)
    assert again.already_complete and "Nothing to do" in again.summary()
    assert again.shards_written == []
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == before


KILLER = textwrap.dedent("""
    import os, signal, sys
    from embedkit import Embedder
    from embedkit.corpus import encode_corpus
    import embedkit.corpus.manifest as manifest  # write_shard writes the shard's metadata
    corpus, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    e = Embedder.from_pretrained({stories!r}, dtype="float32", max_length=48)
    if mode == "mid-shard":  # die after shard 1's vectors and ids are in place but before its metadata
        real = manifest.atomic_write_json
        def dying(path, obj, **kw):
            if str(path).endswith("shard-00001.json"):
                open(str(path.parent / ".shard-00001.json.tmp-x"), "w").write("{{")  # a torn temp file too
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, obj, **kw)
        manifest.atomic_write_json = dying
        hook = None
    else:  # die right after the first shard is finished
        hook = lambda number, meta: os.kill(os.getpid(), signal.SIGKILL)
    encode_corpus(e, [corpus], out, model_spec={stories!r}, shard_size=16, on_shard=hook)
""")


@pytest.mark.parametrize("mode", ["after-shard", "mid-shard"])
def test_kill_9_then_rerun_equals_an_uninterrupted_run(tmp_path, embedder, texts, mode):
    corpus = _corpus(tmp_path, texts)
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(stories=str(STORIES)))
    proc = subprocess.run([sys.executable, str(script), str(corpus), str(tmp_path / "out"), mode],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (tmp_path / "out" / "manifest.json").exists()
    resumed = encode_corpus(embedder, [corpus], tmp_path / "out", model_spec=STORIES, shard_size=16)
    assert resumed.shards_kept == [0] and resumed.shards_written == [1, 2]
    if mode == "mid-shard":
        assert not list((tmp_path / "out" / "shards").glob(".shard-00001*"))  # stale temps cleaned
    encode_corpus(embedder, [corpus], tmp_path / "clean", model_spec=STORIES, shard_size=16)
    assert _checksums(tmp_path / "out") == _checksums(tmp_path / "clean")


def test_changed_model_input_or_options_are_refused(tmp_path, embedder, texts):
    corpus = _corpus(tmp_path, texts[:10])
    encode_corpus(embedder, [corpus], tmp_path / "out", shard_size=8)
    other = Embedder.from_pretrained(STORIES, dtype="float32", max_length=48, pooling="last")
    with pytest.raises(ValueError, match=r"already holds a different encode job.*model: the folder has .*fingerprint"):
        encode_corpus(other, [corpus], tmp_path / "out", shard_size=8)
    with pytest.raises(ValueError, match=r"shard_size: 8 before, 4 now.*new --output folder"):
        encode_corpus(embedder, [corpus], tmp_path / "out", shard_size=4)
    _corpus(tmp_path, texts[:9] + ["a changed last row"])
    with pytest.raises(ValueError, match=r"input: the folder was encoded from .*corpus\.jsonl with other contents"):
        encode_corpus(embedder, [corpus], tmp_path / "out", shard_size=8)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no embedkit job"):
        encode_corpus(embedder, [corpus], foreign)


def test_touched_but_unchanged_input_still_resumes(tmp_path, embedder, texts):
    corpus = _corpus(tmp_path, texts[:6])
    encode_corpus(embedder, [corpus], tmp_path / "out", shard_size=4)
    os.utime(corpus, ns=(1, 1))
    assert encode_corpus(embedder, [corpus], tmp_path / "out", shard_size=4).already_complete


def test_empty_texts_skipped_and_counted_or_strict_error(tmp_path, embedder):
    path = tmp_path / "c.txt"
    path.write_text("first text here\n\n   \nlast text here\n", encoding="utf-8")
    result = encode_corpus(embedder, [path], tmp_path / "out", shard_size=2)
    assert (result.count, result.skipped_empty) == (2, 2)
    vset = open_vectors(tmp_path / "out")
    assert vset.ids() == ["0", "3"]  # ids are row numbers; skipping does not renumber
    assert vset.manifest["skipped_ids_sample"] == ["1", "2"]
    with pytest.raises(ValueError, match=r"c\.txt:2: empty text \(id '1'\).*drop --strict"):
        encode_corpus(embedder, [path], tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict" / "shards").exists()  # failed before encoding anything
    with pytest.raises(ValueError, match="--strict: the input has 2 empty rows"):
        encode_corpus(embedder, [path], tmp_path / "out", shard_size=2, strict=True)


def test_repeated_ids_name_both_rows(tmp_path, embedder):
    path = tmp_path / "dup.jsonl"
    path.write_text('{"_id": "a", "text": "x one"}\n{"_id": "b", "text": "x two"}\n{"_id": "a", "text": "x three"}\n')
    with pytest.raises(ValueError, match=r"Id 'a' repeats: .*dup\.jsonl:1 and .*dup\.jsonl:3"):
        encode_corpus(embedder, [path], tmp_path / "out")


def test_corrupt_or_missing_shard_is_named_and_rerun_repairs_it(tmp_path, embedder, texts):
    corpus = _corpus(tmp_path, texts[:12])
    encode_corpus(embedder, [corpus], tmp_path / "out", shard_size=4)
    good = _checksums(tmp_path / "out")
    shard = tmp_path / "out" / "shards" / "shard-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"Shard shard-00001 .*shard-00001\.npy is corrupt \(sha256 mismatch"):
        open_vectors(tmp_path / "out")
    repaired = encode_corpus(embedder, [corpus], tmp_path / "out", shard_size=4)
    assert repaired.shards_written == [1] and repaired.complete
    assert _checksums(tmp_path / "out") == good
    (tmp_path / "out" / "shards" / "shard-00002.ids.json").unlink()
    with pytest.raises(ValueError, match=r"shard-00002\.ids\.json is missing"):
        open_vectors(tmp_path / "out")


def test_unfinished_folder_says_how_to_resume(tmp_path, embedder, texts):
    corpus = _corpus(tmp_path, texts[:8])
    result = encode_corpus(embedder, [corpus], tmp_path / "out", shard_size=4, rank=0, world_size=2)
    assert not result.complete and "last one to finish" in result.summary()
    with pytest.raises(FileNotFoundError, match="encode has not finished: rerun the same"):
        open_vectors(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="run `embedkit encode` first"):
        open_vectors(tmp_path / "nowhere")


def test_float16_query_role_and_instruction(tmp_path, embedder, texts):
    corpus = _corpus(tmp_path, texts[:5])
    e = Embedder.from_pretrained(STORIES, dtype="float32", max_length=48, query_instruction="Find: ")
    encode_corpus(e, [corpus], tmp_path / "q", role="query", vector_dtype="float16")
    vset = open_vectors(tmp_path / "q")
    assert vset.manifest["options"]["instruction"] == "Find: " and vset.manifest["dtype"] == "float16"
    stored = next(vset.iter_shards())[1]
    assert stored.dtype == np.float16
    np.testing.assert_allclose(stored, e.encode(texts[:5], instruction="Find: "), atol=2e-3)
    encode_corpus(e, [corpus], tmp_path / "plain", instruction="", normalize=False)
    raw = open_vectors(tmp_path / "plain")
    assert raw.manifest["metric"] == "l2" and raw.manifest["options"]["instruction"] is None
    np.testing.assert_allclose(raw.load(), e.encode(texts[:5], normalize=False), atol=2e-5)
    with pytest.raises(ValueError, match="vector dtype must be one of float32, float16"):
        encode_corpus(e, [corpus], tmp_path / "bad", vector_dtype="int8")
    with pytest.raises(ValueError, match="role must be one of document, query"):
        encode_corpus(e, [corpus], tmp_path / "bad", role="passage")
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        encode_corpus(e, [tmp_path / "nope.jsonl"], tmp_path / "bad")
    custom = encode_corpus(e, [corpus], tmp_path / "fields", reader=ReaderOptions(title_field=None))
    assert custom.count == 5


def test_same_size_edit_with_restored_mtime_is_a_changed_input(tmp_path, embedder, texts):
    """Issue 15, 2.3: the input fingerprint covers content, so old vectors never stand for edited texts."""
    corpus = _corpus(tmp_path, texts[:6])
    assert encode_corpus(embedder, [corpus], tmp_path / "out", shard_size=4).complete
    stat = corpus.stat()
    data = corpus.read_text(encoding="utf-8")
    edited = data.replace(texts[2], texts[2][::-1], 1)
    assert edited != data and len(edited.encode()) == stat.st_size
    corpus.write_text(edited, encoding="utf-8")
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert corpus.stat().st_size == stat.st_size and corpus.stat().st_mtime_ns == stat.st_mtime_ns
    with pytest.raises(ValueError, match=r"already holds a different encode job.*input: the folder was encoded "
                                         r"from .*corpus\.jsonl with other contents"):
        encode_corpus(embedder, [corpus], tmp_path / "out", shard_size=4)


def test_a_second_encode_into_the_same_folder_is_refused_while_the_first_runs(tmp_path, embedder, texts):
    """Issue 15, 2.4: one encode per output folder on one host (an advisory lock); ranks keep their split."""
    from embedkit.corpus.lock import encode_lock

    corpus = _corpus(tmp_path, texts[:6])
    with encode_lock(tmp_path / "out"):  # what a running encode holds
        with pytest.raises(ValueError, match=rf"Output folder .*out is being written by another encode \(pid "
                                             rf"{os.getpid()}\); wait for it or choose another --output\."):
            encode_corpus(embedder, [corpus], tmp_path / "out", shard_size=4)
        assert not list((tmp_path / "out").glob("*.json"))  # refused before it wrote anything
        ranked = encode_corpus(embedder, [corpus], tmp_path / "out", shard_size=4, rank=1, world_size=2)
        assert ranked.shards_written == [1]  # torchrun ranks do not take the lock
    done = encode_corpus(embedder, [corpus], tmp_path / "out", shard_size=4)  # the lock is free again
    assert done.complete and done.shards_kept == [1] and done.shards_written == [0]


def test_failed_first_run_leaves_no_folder_and_bad_batch_size_is_refused(tmp_path, embedder, texts):
    corpus = _corpus(tmp_path, texts[:3])
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="The input has no rows"):
        encode_corpus(embedder, [empty], tmp_path / "never")
    assert not (tmp_path / "never").exists()
    for bad in (0, -3):  # issue 15, 2.12: a batch size of 0 was accepted
        with pytest.raises(ValueError, match=rf"batch size must be at least 1, got {bad}: give a positive "
                                             "--batch-size, or leave it unset"):
            encode_corpus(embedder, [corpus], tmp_path / "out", batch_size=bad)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_batch_size_zero_in_one_line_before_the_model_loads(tmp_path, texts):
    from typer.testing import CliRunner

    from embedkit.cli import app

    corpus = _corpus(tmp_path, texts[:3])
    result = CliRunner().invoke(app, ["encode", str(tmp_path / "no-such-model"), "-i", str(corpus), "-o",
                                      str(tmp_path / "out"), "--batch-size", "0"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: batch size must be at least 1, got 0: give a positive "
                                                  "--batch-size, or leave it unset for the model's own."]


def test_precision_and_dimensions_shards(tmp_path, embedder, texts):
    """Quantized shards hold the codes of the float vectors at the calibrated ranges; --dimensions cuts them."""
    from embedkit.quantization import calibration_ranges, quantize, truncate_dimensions

    corpus = _corpus(tmp_path, texts[:30])
    full = embedder.encode(texts[:30])
    encode_corpus(embedder, [corpus], tmp_path / "b", precision="binary", dimensions=20, shard_size=16)
    vset = open_vectors(tmp_path / "b")
    m = vset.manifest
    assert (m["dimension"], m["model_dimension"], m["precision"], m["dtype"]) == (20, 64, "binary", "int8")
    assert m["options"]["dimensions"] == 20 and m["options"]["precision"] == "binary"
    codes = np.concatenate([v for _, v in vset.iter_shards()])
    np.testing.assert_array_equal(codes, quantize(truncate_dimensions(full, 20), "binary"))
    assert codes.shape == (30, 3) and vset.load().shape == (30, 20)

    encode_corpus(embedder, [corpus], tmp_path / "i8", precision="int8", shard_size=16)
    vset = open_vectors(tmp_path / "i8")
    ranges = vset.ranges
    assert vset.manifest["calibration_rows"] == 30 and vset.precision == "int8"
    np.testing.assert_allclose(ranges, calibration_ranges(full), atol=1e-5)
    codes = np.concatenate([v for _, v in vset.iter_shards()])
    assert np.abs(codes.astype(int) - quantize(full, "int8", ranges).astype(int)).max() <= 1  # float noise only
    assert encode_corpus(embedder, [corpus], tmp_path / "i8", precision="int8", shard_size=16).already_complete
    with pytest.raises(ValueError, match=r"^precision must be one of float32, .*got 'int4'\.$"):
        encode_corpus(embedder, [corpus], tmp_path / "bad", precision="int4")
    with pytest.raises(ValueError, match=r"^dimensions must be at least 1, got 0: "):
        encode_corpus(embedder, [corpus], tmp_path / "bad", dimensions=0)
    with pytest.raises(ValueError, match=r"^dimensions must be between 1 and 64, got 65: "):
        encode_corpus(embedder, [corpus], tmp_path / "bad", dimensions=65)
    with pytest.raises(ValueError, match="Differences: .*precision: 'int8' before, 'binary' now"):
        encode_corpus(embedder, [corpus], tmp_path / "i8", precision="binary", shard_size=16)
