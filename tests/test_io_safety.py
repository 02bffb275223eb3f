"""Names from data never escape their folder; non-UTF-8 text names the file and line."""

from __future__ import annotations

import pytest

from embedkit.io import child_path, iter_text_lines, safe_name


@pytest.mark.parametrize("name", ["../../x", "/abs/x", "a/b", "..", "", ".hidden", "x" * 129, None, 3, "a\x00b"])
def test_unsafe_names_are_refused(name, tmp_path):
    with pytest.raises(ValueError, match="is not a safe file name"):
        safe_name(name, "task name")
    with pytest.raises(ValueError, match="task name"):
        child_path(tmp_path, name, "task name")


def test_safe_names_stay_under_their_root(tmp_path):
    assert safe_name("STSBenchmark", "task name") == "STSBenchmark"
    assert child_path(tmp_path, "MSMARCO-5k.v2", "task name") == tmp_path / "MSMARCO-5k.v2"


def test_non_utf8_lines_name_file_and_line(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes("first line\nsecond caf\xe9\n".encode("latin-1"))
    lines = iter_text_lines(path)
    assert next(lines) == (1, "first line")
    with pytest.raises(ValueError, match=r"in\.txt:2: not valid UTF-8 \(byte 0xe9 at column 11\); re-save"):
        next(lines)
