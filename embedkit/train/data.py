"""Training data: find files, read texts / pairs / triplets with file:line errors, pack MNTP blocks, and a
seeded batch order that a resumed run can replay exactly.

Files are checked (exist, non-empty, fields present, enough rows for one batch) before any model loads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedkit.datasets import find_data_dir
from embedkit.io import iter_text_lines


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and line)."""


def resolve_path(path: str, data_dir: Path | None, recipe_dir: Path | None, folders: bool = False) -> Path:
    """An absolute path as is; a relative one in the data folder, then beside the recipe, then the cwd.
    ``folders``: a folder is found too (a ``datasets.save_to_disk`` source)."""
    candidate = Path(path).expanduser()

    def found(full: Path) -> bool:
        return full.is_file() or (folders and full.is_dir())
    if candidate.is_absolute():
        if not found(candidate):
            raise DataError(f"Data file {candidate} does not exist.")
        return candidate
    tried = []
    for base in (data_dir, recipe_dir, Path.cwd()):
        if base is None:
            continue
        full = base / candidate
        tried.append(str(full))
        if found(full):
            return full
    raise DataError(f"Data file {path!r} not found; tried: {', '.join(tried)}. Give a path relative to the data "
                    "folder (e.g. unlabeled/WikiText2/sentences.txt) or an absolute path.")


def default_data_dir(explicit: str | None) -> Path | None:
    try:
        return find_data_dir(explicit)
    except FileNotFoundError:
        if explicit is not None:
            raise
        return None


def _is_jsonl(path: Path, fmt: str) -> bool:
    return fmt == "jsonl" or (fmt == "auto" and path.suffix in (".jsonl", ".json"))


def lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 file; bad bytes are a DataError naming the file and line."""
    try:
        yield from iter_text_lines(path)
    except ValueError as err:
        raise DataError(str(err)) from None


def jsonl_rows(path: Path):
    for number, line in lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg}).") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}.")
        yield number, row


def row_text(where: object, row: dict, name: str, fix: str = "set the stage's data.*_field keys") -> str:
    """The non-empty string ``row[name]``; else a DataError naming ``where`` (file:line) and ``fix``."""
    if name not in row:
        raise DataError(f"{where}: missing field {name!r} (the row has {sorted(row)}); fix the row or {fix}.")
    value = row[name]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {name!r} must be a non-empty string, got {value!r}.")
    return value


def _field(path: Path, number: int, row: dict, name: str) -> str:
    return row_text(f"{path}:{number}", row, name)


def read_texts(path: Path, fmt: str = "auto", text_field: str = "text", limit: int | None = None) -> list[str]:
    """Plain text (one text per line, blank lines skipped) or jsonl (``text_field`` of each row)."""
    texts: list[str] = []
    if _is_jsonl(path, fmt):
        for number, row in jsonl_rows(path):
            texts.append(_field(path, number, row, text_field))
            if limit and len(texts) >= limit:
                break
    else:
        for _, line in lines(path):
            if line.strip():
                texts.append(line.strip())
                if limit and len(texts) >= limit:
                    break
    if not texts:
        raise DataError(f"{path} has no texts (empty file); give a file with one text per line.")
    return texts


@dataclass
class PairRows:
    """Contrastive rows: anchor, positive, hard negatives, optional source (for same-source batches) and
    per-row instruction."""

    anchors: list[str] = field(default_factory=list)
    positives: list[str] = field(default_factory=list)
    negatives: list[list[str]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    instructions: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.anchors)

    def extend(self, other: PairRows) -> None:
        for name in ("anchors", "positives", "negatives", "sources", "instructions"):
            getattr(self, name).extend(getattr(other, name))


def read_pairs(path: Path, spec, n_negatives: int) -> PairRows:
    """jsonl rows with ``anchor_field``, ``positive_field`` and (if ``n_negatives``) negative fields."""
    if not _is_jsonl(path, spec.format):
        raise DataError(f"{path}: supervised data must be jsonl rows with {spec.anchor_field!r} and "
                        f"{spec.positive_field!r} fields.")
    rows = PairRows()
    negative_fields = spec.negative_fields[:n_negatives] if n_negatives else []
    if n_negatives > len(spec.negative_fields):
        raise DataError(f"{path}: hard_negatives={n_negatives} but data.negative_fields lists "
                        f"{len(spec.negative_fields)} ({spec.negative_fields}); list one field per negative.")
    for number, row in jsonl_rows(path):
        rows.anchors.append(_field(path, number, row, spec.anchor_field))
        rows.positives.append(_field(path, number, row, spec.positive_field))
        rows.negatives.append([_field(path, number, row, name) for name in negative_fields])
        rows.sources.append(str(row.get(spec.source_field, path.name)) if spec.source_field else path.name)
        rows.instructions.append(row.get(spec.instruction_field) if spec.instruction_field else None)
        if spec.limit and len(rows) >= spec.limit:
            break
    if not len(rows):
        raise DataError(f"{path} has no rows (empty file).")
    return rows


def pack_blocks(sequences: Sequence[Sequence[int]], block_size: int, separator: int | None,
                bos: int | None = None) -> np.ndarray:
    """Concatenate token sequences (joined by ``separator``) and cut ``block_size`` blocks, as run_mlm's
    group_texts does; each block starts with ``bos`` when the tokenizer uses one. The tail is dropped."""
    stream: list[int] = []
    for seq in sequences:
        seq = list(seq)
        if bos is not None and seq and seq[0] == bos:
            seq = seq[1:]
        stream.extend(seq)
        if separator is not None:
            stream.append(separator)
    body = block_size - (1 if bos is not None else 0)
    n = len(stream) // body
    blocks = np.asarray(stream[: n * body], dtype=np.int64).reshape(n, body)
    if bos is not None:
        blocks = np.concatenate([np.full((n, 1), bos, dtype=np.int64), blocks], axis=1)
    return blocks


def epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch: a permutation from (seed, epoch) only, so a resumed run replays it."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


@dataclass(frozen=True)
class RowGroups:
    """Which source each row comes from and how batches are drawn from the sources.

    ``weights``: each source's share of the batches (any positive scale); None = by size, i.e. one pass over
    every source per epoch. ``same_source``: each batch from one source (hard, comparable in-batch negatives),
    else rows of all sources mixed in a batch.
    """

    names: Sequence[str]
    weights: dict[str, float] | None = None
    same_source: bool = True


def shares(sizes: dict[str, int], weights: dict[str, float], total: int) -> dict[str, int]:
    """``total`` split in proportion to ``weights`` (largest remainders, ties by name): the counts sum to total."""
    whole = sum(weights.values())
    exact = {name: weights[name] / whole * total for name in sizes}
    out = {name: int(value) for name, value in exact.items()}
    rest = sorted(sizes, key=lambda name: (-(exact[name] - out[name]), name))
    for name in rest[: total - sum(out.values())]:
        out[name] += 1
    return out


def _draw(rng: np.random.Generator, rows: Sequence[int], count: int, unit: int) -> list[list[int]]:
    """``count`` runs of ``unit`` rows cut from successive permutations of ``rows`` (whole runs only): a row
    repeats within an epoch only when its source is drawn more than once over."""
    out: list[list[int]] = []
    while len(out) < count:
        order = rng.permutation(rows)
        out += [order[s:s + unit].tolist() for s in range(0, len(order) - unit + 1, unit)]
    return out[:count]


def mixture_epoch_order(groups: RowGroups, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch of a mixture, from (seed, epoch) only. An epoch has as many batches as one pass
    over the data; by size (``weights`` None) it is exactly one pass: same-source batches from one permutation
    per source, mixed batches one permutation of all rows (the plain plan's order)."""
    by_group: dict[str, list[int]] = {}
    for i, name in enumerate(groups.names):
        by_group.setdefault(name, []).append(i)
    sizes = {name: len(by_group[name]) for name in sorted(by_group)}
    if groups.same_source:
        rng = np.random.default_rng([seed, epoch, 1])
        full = {name: n // batch_size for name, n in sizes.items()}
        counts = full if groups.weights is None else shares(
            {n: s for n, s in sizes.items() if full[n]}, groups.weights, sum(full.values()))
        batches = [b for name, count in counts.items() for b in _draw(rng, by_group[name], count, batch_size)]
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]
    rng = np.random.default_rng([seed, epoch])
    if groups.weights is None:
        pool = np.arange(len(groups.names))
    else:
        quotas = shares(sizes, groups.weights, len(groups.names))
        pool = np.asarray(sorted(r for name, q in quotas.items() for run in _draw(rng, by_group[name], q, 1)
                                 for r in run), dtype=np.int64)
    order = rng.permutation(pool)
    return [order[i * batch_size:(i + 1) * batch_size].tolist() for i in range(len(pool) // batch_size)]


class BatchPlan:
    """Global batches for steps 0..total-1: batch ``k`` depends only on (seed, k), never on earlier state, so a
    resumed run replays it and every process computes the same global batch (then takes its ``shard``).

    ``groups``: None (mixed batches of all rows), per-row source names (same-source batches, by size), or a
    ``RowGroups`` (weights, same-source or mixed)."""

    def __init__(self, n_rows: int, batch_size: int, seed: int, groups: Sequence[str] | RowGroups | None = None):
        if batch_size > n_rows:
            raise DataError(f"batch_size={batch_size} is larger than the data ({n_rows} rows): lower batch_size "
                            "or give more data.")
        if groups is not None and not isinstance(groups, RowGroups):
            groups = RowGroups(list(groups))
        self.n_rows, self.batch_size, self.seed, self.groups = n_rows, batch_size, seed, groups
        self._epoch = -1
        self._batches: list[list[int]] = []
        self.per_epoch = self._count()

    def _count(self) -> int:
        if self.groups is None:
            return self.n_rows // self.batch_size
        n = len(mixture_epoch_order(self.groups, self.batch_size, self.seed, 0))
        if n == 0:
            raise DataError(f"same-source batches: no source has batch_size={self.batch_size} rows; lower "
                            "batch_size or use mixed batches.")
        return n

    def batch(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            if self.groups is None:
                order = epoch_order(self.n_rows, self.seed, epoch)
                self._batches = [order[i * self.batch_size:(i + 1) * self.batch_size].tolist()
                                 for i in range(self.per_epoch)]
            else:
                self._batches = mixture_epoch_order(self.groups, self.batch_size, self.seed, epoch)
            self._epoch = epoch
        return self._batches[index]

    def rows(self, steps: range) -> list[int]:
        """The distinct rows the global batches of ``steps`` hold, ascending."""
        return sorted({row for step in steps for row in self.batch(step)})


def shard(rows: Sequence[int], rank: int, world: int) -> list[int]:
    """This process's contiguous share of a global batch (global order = rank order, for gathering)."""
    if len(rows) % world:
        raise DataError(f"batch_size={len(rows)} is not divisible by the {world} processes.")
    n = len(rows) // world
    return list(rows[rank * n:(rank + 1) * n])
