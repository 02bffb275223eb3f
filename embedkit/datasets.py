"""Find and read the local data layout (``../shared/data``, see its README): read at run time, never copied."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

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


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Rows of a .jsonl file; a bad line raises with the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}).") from None


def read_sts(data_dir: str | os.PathLike, split: str = "test", task: str = "STSBenchmark"):
    """(sentences1, sentences2, scores) of an STS task split."""
    rows = list(read_jsonl(Path(data_dir) / "sts" / task / f"{split}.jsonl"))
    return [r["sentence1"] for r in rows], [r["sentence2"] for r in rows], [float(r["score"]) for r in rows]
