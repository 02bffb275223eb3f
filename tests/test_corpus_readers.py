"""Input readers: every format, BEIR title joining and ids, row numbering, and errors that name file:line."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedkit.corpus.readers import ReaderOptions, read_records


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_default_ids_are_global_row_numbers_across_files(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    b = tmp_path / "b.txt"
    b.write_text("three\n\nfive\n", encoding="utf-8")
    records = list(read_records([a, b]))
    assert [(r.row, r.id, r.text) for r in records] == [
        (0, "0", "one"), (1, "1", "two"), (2, "2", "three"), (3, "3", ""), (4, "4", "five")]
    assert records[3].empty and records[3].where == f"{b}:2"


def test_beir_corpus_uses_id_and_joins_title(tmp_path):
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", [
        {"_id": "d1", "title": "Paris", "text": "Capital of France."},
        {"_id": "d2", "title": "", "text": "No title here."},
        {"_id": "d3", "title": "Only title", "text": ""},
    ])
    records = list(read_records([corpus]))
    assert [(r.id, r.text) for r in records] == [
        ("d1", "Paris Capital of France."), ("d2", "No title here."), ("d3", "Only title")]
    plain = list(read_records([corpus], ReaderOptions(title_field=None, title_separator="\n")))
    assert [r.text for r in plain] == ["Capital of France.", "No title here.", ""]
    custom = list(read_records([corpus], ReaderOptions(title_separator=": ")))
    assert custom[0].text == "Paris: Capital of France."


def test_csv_tsv_and_parquet_with_fields(tmp_path):
    csv_path = tmp_path / "x.csv"
    csv_path.write_text('doc,body\nk1,"hello, ""world"""\nk2,"multi\nline"\n', encoding="utf-8")
    tsv_path = tmp_path / "x.tsv"
    tsv_path.write_text('doc\tbody\nk3\tsay "hi"\n', encoding="utf-8")
    pq_path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"doc": [7, 8], "body": ["p one", None]}), pq_path)
    options = ReaderOptions(text_field="body", id_field="doc")
    records = list(read_records([csv_path, tsv_path, pq_path], options))
    assert [(r.id, r.text) for r in records] == [
        ("k1", 'hello, "world"'), ("k2", "multi\nline"), ("k3", 'say "hi"'), ("7", "p one"), ("8", "")]
    assert records[1].where == f"{csv_path}:3"
    assert records[4].where == f"{pq_path}:row 2"


def test_missing_text_field_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(ValueError, match=r"c\.jsonl:2: row has no 'text' field \(fields: body\).*--text-field"):
        list(read_records([path]))


def test_bad_rows_and_files_are_named(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        list(read_records([bad_json]))
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl does not exist"):
        list(read_records([tmp_path / "missing.jsonl"]))
    odd = tmp_path / "x.xml"
    odd.write_text("<a/>")
    with pytest.raises(ValueError, match=r"unsupported input type '\.xml'"):
        list(read_records([odd]))
    number = _write_jsonl(tmp_path / "n.jsonl", [{"text": 5}])
    with pytest.raises(ValueError, match=r"n\.jsonl:1: field 'text' is int, not a string"):
        list(read_records([number]))
    no_id = _write_jsonl(tmp_path / "i.jsonl", [{"_id": "a", "text": "x"}, {"text": "y"}])
    with pytest.raises(ValueError, match=r"i\.jsonl:2: row has no id field '_id'"):
        list(read_records([no_id]))
    wide = tmp_path / "w.csv"
    wide.write_text("text\na,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"w\.csv:2: row has more cells"):
        list(read_records([wide]))
    header = tmp_path / "h.csv"
    header.write_text("body\na\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"h\.csv:1: header has no 'text' column \(columns: body\)"):
        list(read_records([header]))
    with pytest.raises(ValueError, match="No input files"):
        list(read_records([]))


@pytest.mark.parametrize(("name", "good", "bad"), [
    ("c.jsonl", b'{"text": "fine"}\n', b'{"text": "caf\xe9"}\n'),
    ("c.txt", b"fine\n", b"caf\xe9\n"),
    ("c.csv", b"text\nfine\n" + b"more\n" * 3000, b"caf\xe9\n"),  # past the first decoded block
])
def test_non_utf8_input_names_file_and_line(tmp_path, name, good, bad):
    """Issue 15, 2.8: not "'utf-8' codec can't decode byte 0xe9 in position 883" but the file and line."""
    path = tmp_path / name
    path.write_bytes(good + bad)
    line = (good + bad).count(b"\n")
    with pytest.raises(ValueError, match=rf"c\.{path.suffix[1:]}:{line}: not valid UTF-8 \(byte 0xe9 at column "
                                         r"\d+\); re-save the file as UTF-8\."):
        list(read_records([path]))


def test_null_text_is_an_error_but_a_null_title_is_no_title(tmp_path):
    """Issue 15, 2.12: a "text": null row was silently skipped as empty; non-string text is an error."""
    path = _write_jsonl(tmp_path / "n.jsonl", [{"_id": "a", "title": None, "text": "kept"},
                                                {"_id": "b", "text": None}])
    with pytest.raises(ValueError, match=r"n\.jsonl:2: field 'text' is null, not a string: give text \(an empty "
                                         r"string is skipped and counted\)"):
        list(read_records([path]))
    assert next(iter(read_records([path]))).text == "kept"
    empty = _write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "x"}])
    assert [r.empty for r in read_records([empty])] == [True, False]  # empty strings: skipped/--strict as before
