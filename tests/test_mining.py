"""Offline hard-negative mining (embedkit/train/mining.py, `embedkit mine`): ranks, margins and caps checked exactly
on hand-made vectors, exclusions, output formats, inputs with a column mapping, resume, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from embedkit.embedder import open_model
from embedkit.train.mining import MiningOptions, mine_negatives, read_pairs, work_folder

STORIES = Path(__file__).resolve().parent.parent.parent / "shared" / "models" / "stories260K"

# Every text's vector. Anchors a0..a6 are the unit axes 0..6; a document's cosine with anchor k is its component k
# (every value below is exact in binary, so scores compare exactly); the rest of its unit norm sits on its own axis.
# The "a0" document is anchor a0's own text (the positive of pair a3).
#                 a0      a1
DOCS = {"p0": (0.75, 0.5), "p1": (0.875, 0.375), "p2": (0.625, 0.25), "p6": (0.9375, 0.0), "a0": (1.0, 0.0),
        "p3": (0.5, 0.125), "p4": (0.375, 0.0), "p5": (0.25, 0.0)}
PAIRS = [("a0", "p0"), ("a1", "p1"), ("a2", "p2"), ("a0", "p6"), ("a3", "a0"), ("a4", "p3"), ("a5", "p4"),
         ("a6", "p5")]
# Anchor a0, its positives p0 and p6 and its own text excluded, ranks: p1 (1, .875), p2 (2, .625), p3 (3, .5),
# p4 (4, .375), p5 (5, .25). Anchor a1 (positive p1, .375): p0 (1, .5), p2 (2, .25), p3 (3, .125), then zeros.


def vector(text: str) -> np.ndarray:
    out = np.zeros(64, dtype=np.float32)
    if text in DOCS and text != "a0":
        first, second = DOCS[text]
        out[0], out[1] = first, second
        out[20 + sorted(DOCS).index(text)] = np.sqrt(1 - first**2 - second**2)
    else:
        out[int(text[1:])] = 1.0
    return out


@pytest.fixture(scope="module")
def base_embedder():
    embedder = open_model(str(STORIES), dtype="float32")
    embedder.config.query_instruction = "Q: "
    embedder.config.document_instruction = "D: "
    return embedder


@pytest.fixture
def embedder(base_embedder, monkeypatch):
    """The tiny model with a fake encode that gives the hand-made vectors and logs (instruction, texts)."""
    calls = []

    def encode(texts, instruction=None, normalize=None, **_):
        calls.append((instruction, list(texts)))
        return np.stack([vector(t) for t in texts]) if texts else np.zeros((0, 64), np.float32)

    monkeypatch.setattr(base_embedder, "encode", encode)
    base_embedder.calls = calls
    return base_embedder


def write_pairs(path: Path, pairs=PAIRS, columns=("anchor", "positive")) -> Path:
    path.write_text("".join(json.dumps(dict(zip(columns, p, strict=True))) + "\n" for p in pairs))
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def negatives_of(path: Path, anchor: str, positive: str) -> list[str]:
    return [r["negative"] for r in rows(path) if r["anchor"] == anchor and r["positive"] == positive]


def mine(embedder, tmp_path, name="out.jsonl", **options):
    src = tmp_path / "pairs.jsonl"
    if not src.exists():
        write_pairs(src)
    options.setdefault("range_max", 5)
    options.setdefault("num_negatives", 2)
    return mine_negatives(embedder, [src], tmp_path / name, MiningOptions(index_type="flat", **options))


def test_nearest_candidates_skip_the_anchors_positives_and_its_own_text(embedder, tmp_path):
    result = mine(embedder, tmp_path)
    out = tmp_path / "out.jsonl"
    assert negatives_of(out, "a0", "p0") == ["p1", "p2"]  # not "a0" (1.0) nor p6 (.9375), a0's other positive
    assert negatives_of(out, "a0", "p6") == ["p1", "p2"]  # nor p0
    assert negatives_of(out, "a1", "p1") == ["p0", "p2"]
    assert rows(out)[0] == {"anchor": "a0", "positive": "p0", "negative": "p1"}
    assert result.pairs == 8 and result.rows == 16 and result.histogram == {2: 8}
    assert result.histogram_line() == "pairs by negatives found: 2: 8"


def test_margin_is_relative_to_each_pairs_positive_and_strict(embedder, tmp_path):
    mine(embedder, tmp_path, margin=0.0)
    out = tmp_path / "out.jsonl"
    assert negatives_of(out, "a0", "p0") == ["p2", "p3"]  # below .75
    assert negatives_of(out, "a0", "p6") == ["p1", "p2"]  # below .9375
    assert negatives_of(out, "a1", "p1") == ["p2", "p3"]  # below .375
    assert negatives_of(out, "a2", "p2") == []  # every candidate scores 0, as does its positive
    mine(embedder, tmp_path, name="margin.jsonl", margin=0.125)
    assert negatives_of(tmp_path / "margin.jsonl", "a0", "p0") == ["p3", "p4"]  # .625 is not < .75 - .125


def test_rank_range_and_max_score_exactly(embedder, tmp_path):
    mine(embedder, tmp_path, range_min=1, range_max=3, num_negatives=5)
    assert negatives_of(tmp_path / "out.jsonl", "a0", "p0") == ["p2", "p3"]  # ranks 2 and 3 only
    mine(embedder, tmp_path, name="cap.jsonl", max_score=0.5)
    assert negatives_of(tmp_path / "cap.jsonl", "a0", "p0") == ["p3", "p4"]  # .5 is kept (<=)
    result = mine(embedder, tmp_path, name="few.jsonl", range_min=4, range_max=7, margin=0.0, num_negatives=3)
    assert negatives_of(tmp_path / "few.jsonl", "a0", "p0") == ["p5"]  # rank 5 is a0's last candidate
    assert result.histogram_line().startswith("pairs by negatives found: 0: ")


def test_queries_and_documents_use_the_embedders_instructions(embedder, tmp_path):
    mine(embedder, tmp_path)
    documents = [texts for instruction, texts in embedder.calls if instruction == "D: "]
    queries = [texts for instruction, texts in embedder.calls if instruction == "Q: "]
    assert documents == [["p0", "p1", "p2", "p6", "a0", "p3", "p4", "p5"]]  # distinct positives, first-seen order
    assert queries == [[a for a, _ in PAIRS]]
    assert {i for i, _ in embedder.calls} == {"D: ", "Q: "}


def test_ntuple_format_one_row_per_pair_with_negatives(embedder, tmp_path):
    mine(embedder, tmp_path, margin=0.0, output_format="n-tuple")
    out = rows(tmp_path / "out.jsonl")
    assert out[0] == {"anchor": "a0", "positive": "p0", "negatives": ["p2", "p3"]}
    assert "a2" not in [r["anchor"] for r in out]  # no negative, no row


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_csv_and_parquet_with_a_column_mapping(embedder, tmp_path, suffix):
    mine(embedder, tmp_path, name="ref.jsonl")
    src = tmp_path / f"pairs.{suffix}"
    table = {"question": [a for a, _ in PAIRS], "answer": [p for _, p in PAIRS], "extra": ["x"] * len(PAIRS)}
    if suffix == "csv":
        src.write_text("question,answer,extra\n" + "".join(f"{a},{p},x\n" for a, p in PAIRS))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(table), src)
    options = MiningOptions(anchor_column="question", positive_column="answer", range_max=5, num_negatives=2,
                            index_type="flat")
    mine_negatives(embedder, [src], tmp_path / "mapped.jsonl", options)
    assert (tmp_path / "mapped.jsonl").read_bytes() == (tmp_path / "ref.jsonl").read_bytes()


def test_an_interrupted_run_resumes_to_the_same_file(embedder, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    clean.mkdir()
    mine(embedder, clean, chunk_size=3)
    fake = embedder.encode
    searched = []

    def dies_on_second_query_chunk(texts, instruction=None, **kw):
        if instruction == "Q: ":
            searched.append(list(texts))
            if len(searched) == 2:
                raise KeyboardInterrupt
        return fake(texts, instruction=instruction, **kw)

    monkeypatch.setattr(embedder, "encode", dies_on_second_query_chunk)
    with pytest.raises(KeyboardInterrupt):
        mine(embedder, tmp_path, chunk_size=3)
    assert not (tmp_path / "out.jsonl").exists()  # nothing half-written
    monkeypatch.setattr(embedder, "encode", fake)
    embedder.calls.clear()
    result = mine(embedder, tmp_path, chunk_size=3)
    assert result.chunks_kept == [0] and result.chunks_searched == [1, 2]
    assert [texts for i, texts in embedder.calls] == [["a0", "a3", "a4"], ["a5", "a6"]]  # no re-encode
    assert (tmp_path / "out.jsonl").read_bytes() == (clean / "out.jsonl").read_bytes()
    again = mine(embedder, tmp_path, chunk_size=3, output_format="n-tuple", name="out.jsonl")
    assert again.chunks_kept == [0, 1, 2]  # another output format needs no new search


def test_other_options_search_again_but_another_input_is_refused(embedder, tmp_path):
    mine(embedder, tmp_path)
    assert mine(embedder, tmp_path, margin=0.0).chunks_searched == [0]
    write_pairs(tmp_path / "pairs.jsonl", PAIRS[:-1])
    with pytest.raises(ValueError, match=r"^Work folder .*out\.jsonl\.mining holds a mining run of another input: "
                                         r"delete it to start over, or choose another --output\.$"):
        mine(embedder, tmp_path)
    assert work_folder(tmp_path / "out.jsonl") == tmp_path / "out.jsonl.mining"


# -- bad input -----------------------------------------------------------------------------------------------------
def test_range_past_the_corpus(embedder, tmp_path):
    with pytest.raises(ValueError, match=r"^--range-max 8 is past the corpus: .*pairs\.jsonl has 8 distinct positives, "
                                         r"so an anchor has at most 7 candidates; give a range within 0\.\.7\.$"):
        mine(embedder, tmp_path, range_max=8)
    with pytest.raises(ValueError, match=r"^--range-min 7 is past the corpus: "):
        mine(embedder, tmp_path, range_min=7, range_max=None)
    assert not work_folder(tmp_path / "out.jsonl").exists()  # refused before any work


@pytest.mark.parametrize(("options", "message"), [
    ({"range_min": 5, "range_max": 3}, "--range-min 5 is not below --range-max 3: candidates are ranked range-min+1 "
                                       ".. range-max, so give a range-max above range-min."),
    ({"range_min": 3, "range_max": 3}, "--range-min 3 is not below --range-max 3"),
    ({"num_negatives": 0}, "--num-negatives must be at least 1, got 0."),
    ({"range_min": -1}, "--range-min must be 0 or more"),
    ({"margin": float("nan")}, "--margin must be a finite number, got nan."),
    ({"output_format": "pairs"}, "mining setting 'output_format'"),
])
def test_bad_options_one_line(options, message):
    with pytest.raises(ValueError) as err:
        MiningOptions(**options)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_missing_columns_name_the_file_the_columns_and_the_mapping(tmp_path):
    src = write_pairs(tmp_path / "qa.jsonl", columns=("query", "pos"))
    with pytest.raises(ValueError) as err:
        read_pairs([src], MiningOptions(positive_column="pos"))
    assert str(err.value) == (f"{src}: no column 'anchor' (columns found: query, pos); the mapping expects "
                              "anchor='anchor', positive='pos': set --anchor-column / --positive-column.")
    csv_src = tmp_path / "qa.csv"
    csv_src.write_text("q,a\nx,y\n")
    with pytest.raises(ValueError, match=r"qa\.csv: no column 'anchor', 'positive' \(columns found: q, a\)"):
        read_pairs([csv_src], MiningOptions())


def test_empty_texts_are_skipped_and_counted(embedder, tmp_path):
    write_pairs(tmp_path / "pairs.jsonl", [*PAIRS, ("", "p1"), ("a1", "  ")])
    result = mine(embedder, tmp_path)
    assert result.pairs == 8 and result.skipped == 2
    assert "2 pairs with an empty text skipped" in result.summary()


# -- the command ---------------------------------------------------------------------------------------------------
def test_mine_command_real_model_and_bad_input_lines(tmp_path):
    from embedkit.cli import app

    src = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "triplets.jsonl"
    runner = CliRunner()
    result = runner.invoke(app, ["mine", str(STORIES), "--input", str(src), "--output", str(out), "--range-max", "4",
                                 "--num-negatives", "3", "--index-type", "flat"])
    assert result.exit_code == 0, result.output
    assert "pairs by negatives found: 3: 8" in result.output
    assert len(rows(out)) == 24 and set(rows(out)[0]) == {"anchor", "positive", "negative"}
    bad = runner.invoke(app, ["mine", str(STORIES), "--input", str(src), "--output", str(out), "--range-min", "4",
                              "--range-max", "2"])
    assert bad.exit_code == 2 and "error: --range-min 4 is not below --range-max 2" in bad.output
    past = runner.invoke(app, ["mine", "no-such-model", "--input", str(src), "--output", str(out), "--range-max", "9"])
    assert past.exit_code == 2 and "error: --range-max 9 is past the corpus" in past.output  # before the model loads


def test_a_positive_shared_by_pairs_is_one_corpus_text_and_never_a_negative_of_its_anchors(embedder, tmp_path):
    write_pairs(tmp_path / "pairs.jsonl", [*PAIRS, ("a1", "p0")])
    mine(embedder, tmp_path)
    out = tmp_path / "out.jsonl"
    assert negatives_of(out, "a1", "p1") == ["p2", "p3"]  # p0 (.5) is a1's positive now
    assert negatives_of(out, "a1", "p0") == ["p2", "p3"]
    documents = [texts for instruction, texts in embedder.calls if instruction == "D: "]
    assert documents == [["p0", "p1", "p2", "p6", "a0", "p3", "p4", "p5"]]
