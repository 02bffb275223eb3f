"""Find and read the local data layout (``../shared/data``, see its README): read at run time, never copied."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

from embedkit.io import iter_text_lines

DATA_ENV = "EMBEDKIT_DATA"


def find_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data folder: the argument, else $EMBEDKIT_DATA, else ../shared/data beside the checkout or cwd."""
    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(Path(explicit))
    elif os.environ.get(DATA_ENV):
        candidates.append(Path(os.environ[DATA_ENV]))
    else:
        repo = Path(__file__).resolve().parent.parent
        candidates += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for candidate in candidates:
        if (candidate / "README.md").is_file() or any(candidate.glob("*/*/task.json")):
            return candidate
    raise FileNotFoundError(
        "No data folder found (looked in: " + ", ".join(str(c) for c in candidates) + "). Put the shared "
        f"data beside the checkout as ../shared/data, pass --data DIR, or set ${DATA_ENV}."
    )


def read_jsonl_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a .jsonl file, blank lines skipped; bad UTF-8 or JSON names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    for number, line in iter_text_lines(path):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}).") from None


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Rows of a .jsonl file; a bad line raises with the file and line number."""
    for _, row in read_jsonl_lines(path):
        yield row


def sts_row(row: dict, where: str) -> tuple[str, str, float]:
    """One STS row checked: two non-empty sentences and a numeric score; an error names ``where`` and the field."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with sentence1, sentence2, score.")
    for key in ("sentence1", "sentence2"):
        value = row.get(key)
        if not isinstance(value, str) or not value.strip():
            what = "missing" if key not in row else "empty" if isinstance(value, str) else type(value).__name__
            raise ValueError(f"{where}: field {key!r} is {what}; every STS row needs two non-empty sentences "
                             "(fix or remove the row).")
    score = row.get("score")
    try:
        value = float(score) if not isinstance(score, bool) and isinstance(score, int | float | str) else None
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        raise ValueError(f"{where}: field 'score' is {score!r}, not a number; STS rows need a numeric gold score.")
    return row["sentence1"], row["sentence2"], value


def read_sts(data_dir: str | os.PathLike, split: str = "test", task: str = "STSBenchmark"):
    """(sentences1, sentences2, scores) of an STS task split, every row checked (errors name file:line)."""
    path = Path(data_dir) / "sts" / task / f"{split}.jsonl"
    rows = [sts_row(row, f"{path}:{number}") for number, row in read_jsonl_lines(path)]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
