"""A stage's data sources: read each one (local file, ``save_to_disk`` folder, or Hugging Face dataset) through
its column mapping into anchors / positives / negatives or texts, and give each source its share of the batches.

One reader per format: jsonl and plain text as in ``train/data.py``, csv / tsv / parquet from
``embedkit.corpus.readers``, folders and hub ids with the ``datasets`` library. Every bad row is named by
``file:line`` (``file:row N`` for parquet, ``id:row N`` for datasets); a mapping that does not fit the data
names the source, the columns found and the mapping expected. The original ``data: {paths: [...]}`` form
reads as before (``read_texts`` / ``read_pairs``), each path one source.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from embedkit.corpus.readers import iter_delimited_rows, iter_parquet_rows
from embedkit.train.config import DataSpec, SourceList, SourceSpec
from embedkit.train.data import DataError, PairRows, jsonl_rows, lines, read_pairs, read_texts, resolve_path, row_text

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".txt": "text"}
FIX = "set the source's columns: (anchor/positive/negative, or text)"
Wanted = Callable[[list[str], str], list[str]]  # (columns found, where) -> columns to read; raises on a mismatch


@dataclass
class TextRows:
    """Texts of a stage and the source each came from."""

    texts: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def source_format(path: Path) -> str:
    """``disk`` for a ``save_to_disk`` folder, else the file's format by suffix; anything else is a DataError."""
    if path.is_dir():
        if not any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
            raise DataError(f"{path} is a folder but not one saved by datasets' save_to_disk (no state.json); give "
                            "a .jsonl/.csv/.tsv/.parquet/.txt file or a save_to_disk folder.")
        return "disk"
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unsupported data file type {path.suffix or '(none)'!r}; supported: "
                        f"{', '.join(SUFFIXES)}, or a save_to_disk folder.")
    return SUFFIXES[path.suffix.lower()]


def _hub_dataset(spec: SourceSpec):
    """``datasets.load_dataset(id, subset, split=...)``; no network (or no such set) is one line saying how to
    provide a local copy."""
    import datasets  # noqa: PLC0415 - heavy, needed only for hub and save_to_disk sources

    try:
        return datasets.load_dataset(spec.dataset, spec.subset, split=spec.split)
    except (ConnectionError, OSError, ValueError) as err:  # offline, not found, unknown subset or split
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"Hugging Face dataset {spec.label!r} could not be loaded ({reason[:160]}): it needs the "
                        "hub, or a local copy: where there is network run datasets.load_dataset(...)"
                        ".save_to_disk(FOLDER) and give the source path: FOLDER.") from None


def _disk_dataset(path: Path):
    import datasets  # noqa: PLC0415

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"{path} holds the splits {sorted(loaded)}; give one of them as the path "
                        f"({path}/{next(iter(loaded))}).")
    return loaded


def _dataset_rows(dataset, name: str, wanted: Wanted) -> Iterator[tuple[str, dict]]:
    columns = wanted(list(dataset.column_names), name)
    number = 0
    for batch in dataset.select_columns(columns).iter(batch_size=4096):
        for values in zip(*(batch[c] for c in columns), strict=True):
            number += 1
            yield f"{name}:row {number}", dict(zip(columns, values, strict=True))


def _file_rows(path: Path, fmt: str, wanted: Wanted) -> Iterator[tuple[str, dict]]:
    if fmt == "jsonl":
        for number, row in jsonl_rows(path):
            yield f"{path}:{number}", row
    elif fmt == "text":
        wanted(["text"], str(path))
        for number, line in lines(path):
            if line.strip():
                yield f"{path}:{number}", {"text": line.strip()}
    elif fmt in ("csv", "tsv"):
        yield from iter_delimited_rows(path, "," if fmt == "csv" else "\t", lambda header: wanted(header, str(path)))
    elif fmt == "parquet":
        yield from iter_parquet_rows(path, lambda names: wanted(names, str(path)))
    else:
        yield from _dataset_rows(_disk_dataset(path), str(path), wanted)


def source_rows(spec: SourceSpec, data_dir: Path | None, recipe_dir: Path | None, wanted: Wanted
                ) -> Iterator[tuple[str, dict]]:
    """(where, row) of one source in order, ``wanted`` checked against its columns before the first row (jsonl:
    the first row's keys). Reader errors (bad UTF-8, bad JSON, extra cells) are DataErrors naming file:line."""
    if spec.dataset is not None:
        yield from _dataset_rows(_hub_dataset(spec), spec.label, wanted)
        return
    path = resolve_path(spec.path, data_dir, recipe_dir, folders=True)
    fmt = source_format(path)
    try:
        first = True
        for where, row in _file_rows(path, fmt, wanted):
            if first and fmt == "jsonl":
                wanted(sorted(row), str(path))
            first = False
            yield where, row
    except DataError:
        raise
    except ValueError as err:  # the readers' file:line messages
        raise DataError(str(err)) from None


def _mismatch(where: str, found: list[str], expected: dict[str, object]) -> DataError:
    mapping = ", ".join(f"{role}={name!r}" for role, name in expected.items())
    return DataError(f"{where}: columns {found} do not match the mapping {{{mapping}}}; {FIX}.")


def read_source_pairs(spec: SourceSpec, hard_negatives: int, data_dir: Path | None, recipe_dir: Path | None
                      ) -> PairRows:
    """(anchor, positive[, negatives]) rows of one source. Without a ``negative`` mapping a ``negative`` column is
    used if present: a source without one gives pairs (in-batch negatives only for its rows)."""
    cols = spec.columns
    if spec.inverse_cloze:
        return _inverse_cloze_rows(spec, _read_texts(spec, data_dir, recipe_dir))
    if cols.text is not None:
        raise DataError(f"source {spec.label!r} maps a text column, but this stage reads (anchor, positive) rows; "
                        "map anchor and positive (and negative), or set inverse_cloze: N to pair its texts.")
    anchor, positive = cols.anchor or "anchor", cols.positive or "positive"
    chosen: list[str] = []

    def wanted(found: list[str], where: str) -> list[str]:
        negatives = [cols.negative] if isinstance(cols.negative, str) else list(cols.negative or [])
        if cols.negative is None and "negative" in found:
            negatives = ["negative"]
        expected = {"anchor": anchor, "positive": positive} | ({"negative": cols.negative} if negatives else {})
        if any(c not in found for c in (anchor, positive, *negatives)):
            raise _mismatch(where, found, expected)
        chosen[:] = negatives[:hard_negatives]
        return [anchor, positive, *chosen]

    rows = PairRows()
    for where, row in source_rows(spec, data_dir, recipe_dir, wanted):
        rows.anchors.append(row_text(where, row, anchor, FIX))
        rows.positives.append(row_text(where, row, positive, FIX))
        rows.negatives.append([row_text(where, row, name, FIX) for name in chosen])
        rows.sources.append(spec.label)
        rows.instructions.append(spec.instruction)
        if spec.limit and len(rows) >= spec.limit:
            break
    if not len(rows):
        raise DataError(f"source {spec.label!r} has no rows (empty); give it rows or leave it out.")
    return rows


def inverse_cloze_pairs(texts: list[str], context: int) -> list[tuple[str, str]]:
    """Inverse-cloze pairs (Lee et al. 2019, ORQA): the texts in order, cut into runs of ``context`` + 1; in run k
    the text at position k mod (context + 1) is the anchor and the other texts of the run, joined in order, its
    positive; a last, shorter run is dropped. A sentence against the passage it was cut from is the query ->
    passage shape that retrieval needs, made from unlabeled text (consecutive sentences of documents)."""
    size = context + 1
    out = []
    for k, start in enumerate(range(0, len(texts) - size + 1, size)):
        run, pick = texts[start:start + size], k % size
        out.append((run[pick], " ".join(run[:pick] + run[pick + 1:])))
    return out


def _inverse_cloze_rows(spec: SourceSpec, texts: list[str]) -> PairRows:
    made = inverse_cloze_pairs(texts, spec.inverse_cloze)
    if not made:
        raise DataError(f"source {spec.label!r} has {len(texts)} texts, fewer than the inverse_cloze run of "
                        f"{spec.inverse_cloze + 1}; give it more texts or a smaller inverse_cloze.")
    return PairRows(anchors=[a for a, _ in made], positives=[p for _, p in made], negatives=[[] for _ in made],
                    sources=[spec.label] * len(made), instructions=[spec.instruction] * len(made))


def read_source_texts(spec: SourceSpec, data_dir: Path | None, recipe_dir: Path | None) -> list[str]:
    """The texts of one source (its ``text`` column; a .txt file: its non-blank lines)."""
    if spec.inverse_cloze:
        raise DataError(f"source {spec.label!r} sets inverse_cloze, which pairs texts for the pair objectives; this "
                        "stage reads texts as they are: leave inverse_cloze out.")
    return _read_texts(spec, data_dir, recipe_dir)


def _read_texts(spec: SourceSpec, data_dir: Path | None, recipe_dir: Path | None) -> list[str]:
    cols = spec.columns
    if any(c is not None for c in (cols.anchor, cols.positive, cols.negative)):
        raise DataError(f"source {spec.label!r} maps anchor/positive columns, but this stage reads texts; map "
                        "text: COLUMN.")
    column = cols.text or "text"

    def wanted(found: list[str], where: str) -> list[str]:
        if column not in found:
            raise _mismatch(where, found, {"text": column})
        return [column]

    texts: list[str] = []
    for where, row in source_rows(spec, data_dir, recipe_dir, wanted):
        texts.append(row_text(where, row, column, FIX))
        if spec.limit and len(texts) >= spec.limit:
            break
    if not texts:
        raise DataError(f"source {spec.label!r} has no texts (empty); give it rows or leave it out.")
    return texts


def read_stage_pairs(data: DataSpec | SourceList, hard_negatives: int, data_dir: Path | None,
                     recipe_dir: Path | None) -> PairRows:
    """Every source's rows, in source order."""
    rows = PairRows()
    if isinstance(data, DataSpec):
        for path in data.paths:
            rows.extend(read_pairs(resolve_path(path, data_dir, recipe_dir), data, hard_negatives))
    else:
        for spec in data.sources:
            rows.extend(read_source_pairs(spec, hard_negatives, data_dir, recipe_dir))
    return rows


def read_stage_texts(data: DataSpec | SourceList, data_dir: Path | None, recipe_dir: Path | None) -> TextRows:
    """Every source's texts, in source order (the original form: each file a source named by its file name)."""
    out = TextRows()
    if isinstance(data, DataSpec):
        for path in data.paths:
            full = resolve_path(path, data_dir, recipe_dir)
            texts = read_texts(full, data.format, data.text_field, data.limit)
            out.texts += texts
            out.sources += [full.name] * len(texts)
    else:
        for spec in data.sources:
            texts = read_source_texts(spec, data_dir, recipe_dir)
            out.texts += texts
            out.sources += [spec.label] * len(texts)
    return out


def source_weights(data: SourceList, sources: list[str]) -> dict[str, float] | None:
    """Each source's share of the batches: its ``weight``, else rows ** ``sampling_exponent``; None when that is
    plain size (every exponent 1), which makes an epoch exactly one pass over every source."""
    specs = data.sources
    if all(s.weight is None and s.sampling_exponent == 1.0 for s in specs):
        return None
    counts = {s.label: 0 for s in specs}
    for name in sources:
        counts[name] += 1
    return {s.label: s.weight if s.weight is not None else counts[s.label] ** s.sampling_exponent for s in specs}
