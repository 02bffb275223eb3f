"""Stream (id, text) records out of .jsonl, .csv, .tsv, .parquet and .txt files, one row at a time.

Every record carries where it came from (``file:line``) so a bad row can be named, and a global row number
(0-based, across all inputs in order) that gives default ids and stable shard boundaries.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from embedkit.io import iter_text_lines

FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".txt": "txt"}
BEIR_ID_FIELD = "_id"


@dataclass(frozen=True)
class ReaderOptions:
    """How rows become (id, text); saved in the manifest so the same texts can be read again later.

    ``id_field=None``: a BEIR ``_id`` field if the file has one, else the global row number. ``title_field``:
    when a row has it (BEIR corpora do), a non-empty title is joined before the text with
    ``title_separator`` (a space, as BEIR / MTEB evaluate and most embedders were trained); ``None`` disables.
    """

    text_field: str = "text"
    id_field: str | None = None
    title_field: str | None = "title"
    title_separator: str = " "

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Record:
    row: int  # global row number, 0-based, across all inputs
    id: str
    text: str  # "" when the row's text is empty (the row is skipped and counted, or an error under strict)
    where: str  # "file:line" (or "file:row N" for parquet)

    @property
    def empty(self) -> bool:
        return not self.text.strip()


def input_format(path: str | os.PathLike) -> str:
    """The reader for a file, by extension; an unknown one is a clear error."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: unsupported input type {suffix or '(no extension)'!r}; supported: "
                         f"{', '.join(FORMATS)} (a BEIR corpus.jsonl is a .jsonl).")
    return FORMATS[suffix]


def check_inputs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Every input must exist and have a known type; named in the error if not."""
    if not paths:
        raise ValueError("No input files given: pass --input FILE (repeatable).")
    out = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Input file {path} does not exist (or is not a file): check the path.")
        input_format(path)
        out.append(path)
    return out


def _as_text(value, field: str, where: str, null_ok: bool = False) -> str:
    """A text cell; null is "" only where allowed (a missing title), a null text is an error like any non-string."""
    if value is None and null_ok:
        return ""
    if isinstance(value, str):
        return value
    kind = "null" if value is None else type(value).__name__
    raise ValueError(f"{where}: field {field!r} is {kind}, not a string: give text (an empty string is skipped "
                     "and counted), or pick another column with --text-field.")


def _as_id(value, field: str, where: str) -> str:
    if isinstance(value, bool) or value is None or not isinstance(value, (str, int)):
        raise ValueError(f"{where}: id field {field!r} is {'missing' if value is None else type(value).__name__};"
                         " ids must be strings or integers (or leave --id-field unset for row numbers).")
    text = str(value)
    if not text:
        raise ValueError(f"{where}: id field {field!r} is empty; every row needs an id.")
    return text


class _RowMaker:
    """Turns one parsed row (a dict) into a Record according to the options."""

    def __init__(self, options: ReaderOptions, path: Path, first_row: dict | None, columns: Sequence[str] = (),
                 null_text_ok: bool = False):
        self.o = options
        self.path = path
        self.null_text_ok = null_text_ok  # parquet: a null cell is a missing value (empty); JSON null is an error
        keys = set(columns) | set(first_row or {})
        self.id_field = options.id_field or (BEIR_ID_FIELD if BEIR_ID_FIELD in keys else None)
        self.columns = sorted(keys)

    def make(self, row: dict, number: int, where: str) -> Record:
        o = self.o
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object per line, got {type(row).__name__}.")
        if o.text_field not in row:
            raise ValueError(f"{where}: row has no {o.text_field!r} field (fields: {', '.join(sorted(row)) or '-'});"
                             " name the text column with --text-field.")
        text = _as_text(row[o.text_field], o.text_field, where, null_ok=self.null_text_ok)
        if o.title_field and o.title_field in row:
            title = _as_text(row[o.title_field], o.title_field, where, null_ok=True)
            if title.strip():
                text = title + o.title_separator + text if text.strip() else title
        if self.id_field is None:
            rid = str(number)
        else:
            if self.id_field not in row:
                raise ValueError(f"{where}: row has no id field {self.id_field!r} (fields: "
                                 f"{', '.join(sorted(row))}); fix the row or choose --id-field.")
            rid = _as_id(row[self.id_field], self.id_field, where)
        return Record(number, rid, text, where)


def _read_jsonl(path: Path, options: ReaderOptions, start: int) -> Iterator[Record]:
    maker = None
    number = start
    for line_no, line in iter_text_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg}); fix or remove the line.") from None
        if maker is None:
            maker = _RowMaker(options, path, row if isinstance(row, dict) else None)
        yield maker.make(row, number, where)
        number += 1


def iter_delimited_rows(path: Path, delimiter: str, check_header: Callable[[list[str]], None] | None = None
                        ) -> Iterator[tuple[str, dict]]:
    """(``file:line``, row) of a .csv / .tsv file with a header; ``check_header`` sees the columns first. A row
    with more cells than the header is an error; fewer cells leave fields missing."""
    try:
        yield from _delimited_rows(path, delimiter, check_header)
    except UnicodeDecodeError:  # the text layer decodes in blocks, so it cannot say which line: find it
        for _ in iter_text_lines(path):
            pass
        raise


def _delimited_rows(path: Path, delimiter: str, check_header: Callable[[list[str]], None] | None
                    ) -> Iterator[tuple[str, dict]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE  # TSV: tabs separate, quotes are text
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=quoting)
        header = reader.fieldnames or []
        if check_header is not None:
            check_header(list(header))
        line_start = reader.line_num + 1
        for row in reader:
            where = f"{path}:{line_start}"
            if None in row:  # more cells than header columns
                raise ValueError(f"{where}: row has more cells than the header's {len(header)} columns.")
            yield where, {k: v for k, v in row.items() if v is not None}  # fewer cells: missing fields
            line_start = reader.line_num + 1


def _read_delimited(path: Path, options: ReaderOptions, start: int, delimiter: str) -> Iterator[Record]:
    makers: list[_RowMaker] = []

    def check(header: list[str]) -> None:
        if options.text_field not in header:
            raise ValueError(f"{path}:1: header has no {options.text_field!r} column (columns: "
                             f"{', '.join(header) or '-'}); name the text column with --text-field.")
        if options.id_field and options.id_field not in header:
            raise ValueError(f"{path}:1: header has no id column {options.id_field!r} (columns: "
                             f"{', '.join(header)}).")
        makers.append(_RowMaker(options, path, None, header))
    for number, (where, row) in enumerate(iter_delimited_rows(path, delimiter, check), start=start):
        yield makers[0].make(row, number, where)


def _read_txt(path: Path, start: int) -> Iterator[Record]:
    number = start
    for line_no, line in iter_text_lines(path):
        yield Record(number, str(number), line, f"{path}:{line_no}")
        number += 1


def iter_parquet_rows(path: Path, columns: Callable[[list[str]], list[str]]) -> Iterator[tuple[str, dict]]:
    """(``file:row N``, row) of a .parquet file, a batch at a time; ``columns`` sees the file's columns and
    returns those to read. A null cell is None."""
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415
    except ImportError as err:  # pragma: no cover - pyarrow is a dependency
        raise ValueError("Reading .parquet needs pyarrow: pip install pyarrow.") from err
    handle = pq.ParquetFile(path)
    wanted = columns(list(handle.schema_arrow.names))
    in_file = 0
    for batch in handle.iter_batches(batch_size=4096, columns=list(dict.fromkeys(wanted))):
        for row in batch.to_pylist():
            in_file += 1
            yield f"{path}:row {in_file}", row


def _read_parquet(path: Path, options: ReaderOptions, start: int) -> Iterator[Record]:
    makers: list[_RowMaker] = []

    def columns(names: list[str]) -> list[str]:
        if options.text_field not in names:
            raise ValueError(f"{path}: no {options.text_field!r} column (columns: {', '.join(names)}); name the "
                             "text column with --text-field.")
        if options.id_field and options.id_field not in names:
            raise ValueError(f"{path}: no id column {options.id_field!r} (columns: {', '.join(names)}).")
        makers.append(_RowMaker(options, path, None, names, null_text_ok=True))
        return [c for c in (options.text_field, makers[0].id_field, options.title_field) if c and c in names]
    for number, (where, row) in enumerate(iter_parquet_rows(path, columns), start=start):
        yield makers[0].make(row, number, where)


def read_file(path: str | os.PathLike, options: ReaderOptions | None = None, start: int = 0) -> Iterator[Record]:
    """Records of one file; row numbers start at ``start``."""
    options = options or ReaderOptions()
    path = Path(path)
    fmt = input_format(path)
    if not path.is_file():
        raise FileNotFoundError(f"Input file {path} does not exist (or is not a file): check the path.")
    if fmt == "jsonl":
        return _read_jsonl(path, options, start)
    if fmt in ("csv", "tsv"):
        return _read_delimited(path, options, start, "," if fmt == "csv" else "\t")
    if fmt == "parquet":
        return _read_parquet(path, options, start)
    return _read_txt(path, start)


def read_records(paths: Sequence[str | os.PathLike], options: ReaderOptions | None = None) -> Iterator[Record]:
    """Records of several files in order, with one global row numbering (flat memory: a row at a time)."""
    paths = check_inputs(paths)
    number = 0
    for path in paths:
        for record in read_file(path, options, start=number):
            yield record
            number = record.row + 1
