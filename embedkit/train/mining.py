"""Offline hard-negative mining: (anchor, positive) pairs -> (anchor, positive, negative) training rows.

Why offline: in-batch negatives are random and mostly easy; a negative that the model itself ranks near the anchor
teaches more, and mining it once before training costs one encode of the positives, not a search per step.

How: the distinct positive texts are the corpus. They are encoded by the corpus encoder (``embedkit encode``'s code,
the embedder's document instruction, normalised: scores are cosines) and indexed by the index code (``embedkit
index build``); each anchor is encoded as a query (the embedder's query instruction) and searched. A candidate is
never one of the anchor's own positives (every positive the anchor has anywhere in the input) nor a text equal to
the anchor; the rest are ranked from 1 (the nearest). A candidate is kept when

    range_min < rank <= range_max          (sentence-transformers' convention: skip the range_min nearest)
    score < positive score - margin        (only with ``margin``; the positive's own cosine with the anchor)
    score <= max_score                     (only with ``max_score``)

and an anchor's negatives are the first ``num_negatives`` kept, nearest first.

Resume: the work folder ``<output>.mining/`` beside the output holds

    job.json                  inputs' checksums, column mapping and model fingerprint (another job is refused)
    corpus.jsonl              the distinct positives, one ``{"text"}`` per line (line n = corpus position n)
    vectors/, index/          the encode and index folders (each resumable / up-to-date checked by its own code)
    chunks/chunk-00000.json   the negatives of pairs [n * chunk_size, (n + 1) * chunk_size), written atomically

A killed run keeps its finished chunks; the output is written from all chunks at the end, atomically, so the same
inputs and options give the same file however often the run was interrupted.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import model_validator

from embedkit.corpus.encode import encode_corpus
from embedkit.corpus.job import describe_inputs
from embedkit.corpus.manifest import open_vectors
from embedkit.corpus.readers import ReaderOptions, check_inputs, input_format, read_records
from embedkit.index import BuildOptions, Index, VectorSource, build_index
from embedkit.io import (
    StrictConfig,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    iter_text_lines,
    json_digest,
    read_json,
)

DEFAULT_RANGE_MAX = 100  # candidates looked at per anchor when --range-max is not given (fewer in a smaller corpus)
WORK_SUFFIX = ".mining"
JOB_FORMAT = "embedkit-mining"


class MiningOptions(StrictConfig):
    """What to mine; saved in the work folder's chunks (their key), so a rerun with other options redoes the search
    but keeps the vectors and the index."""

    label: ClassVar[str] = "mining"

    anchor_column: str = "anchor"
    positive_column: str = "positive"
    range_min: int = 0
    range_max: int | None = None  # None: DEFAULT_RANGE_MAX, or every candidate of a smaller corpus
    margin: float | None = None
    max_score: float | None = None
    num_negatives: int = 1
    output_format: Literal["triplet", "n-tuple"] = "triplet"
    query_instruction: str | None = None  # None: the embedder's query instruction; "": none
    index_type: str = "auto"
    chunk_size: int = 2048
    batch_size: int | None = None

    @model_validator(mode="after")
    def _check(self) -> MiningOptions:
        if self.range_min < 0:
            raise ValueError(f"--range-min must be 0 or more (the nearest candidates to skip), got {self.range_min}.")
        if self.range_max is not None and self.range_max <= self.range_min:
            raise ValueError(f"--range-min {self.range_min} is not below --range-max {self.range_max}: candidates are "
                             "ranked range-min+1 .. range-max, so give a range-max above range-min.")
        if self.num_negatives < 1:
            raise ValueError(f"--num-negatives must be at least 1, got {self.num_negatives}.")
        for name in ("margin", "max_score"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}.")
        if self.chunk_size < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise ValueError("--chunk-size and --batch-size must be at least 1.")
        if self.anchor_column == self.positive_column:
            raise ValueError(f"The anchor and positive columns are both {self.anchor_column!r}: name two columns.")
        return self

    def selection(self) -> dict:
        """The settings that decide which negatives a pair gets (not how they are written or batched)."""
        return self.model_dump(exclude={"output_format", "batch_size"})


# -- input --------------------------------------------------------------------------------------------------------
@dataclass
class Pairs:
    """The input pairs, with the positives as a corpus of distinct texts (``positives[i]`` is pair i's position)."""

    anchors: list[str]
    positives: list[int]
    corpus: list[str]
    skipped: int = 0  # pairs with an empty anchor or positive
    where: str = ""  # the input files, for messages

    def excluded(self) -> dict[str, set[int]]:
        """Per anchor text: the corpus positions it must never get as a negative (its positives, itself)."""
        position = {text: i for i, text in enumerate(self.corpus)}
        out: dict[str, set[int]] = {}
        for anchor, positive in zip(self.anchors, self.positives, strict=True):
            banned = out.setdefault(anchor, {position[anchor]} if anchor in position else set())
            banned.add(positive)
        return out


def file_columns(path: Path) -> list[str] | None:
    """The columns of a pairs file (a .jsonl's first row's keys), or None where the reader will name the problem."""
    fmt = input_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415

        return list(pq.read_schema(path).names)
    if fmt in ("csv", "tsv"):
        with path.open(encoding="utf-8", newline="") as handle:
            return next(csv.reader(handle, delimiter="," if fmt == "csv" else "\t"), [])
    if fmt == "txt":
        return []
    for _, line in iter_text_lines(path):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                return None
            return list(row) if isinstance(row, dict) else None
    return []


def check_columns(path: Path, options: MiningOptions) -> None:
    """A file without the mapped columns: one line naming the file, the columns found and the mapping expected."""
    columns = file_columns(path)
    if columns is None:
        return
    missing = [c for c in (options.anchor_column, options.positive_column) if c not in columns]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(map(repr, missing))} (columns found: "
                         f"{', '.join(columns) or 'none'}); the mapping expects anchor={options.anchor_column!r}, "
                         f"positive={options.positive_column!r}: set --anchor-column / --positive-column.")


def read_pairs(inputs: Sequence[str | os.PathLike], options: MiningOptions) -> Pairs:
    """Every (anchor, positive) row of ``inputs`` (.jsonl, .csv, .tsv, .parquet; read by the corpus readers)."""
    paths = check_inputs(inputs)
    for path in paths:
        check_columns(path, options)
    readers = [ReaderOptions(text_field=column, title_field=None)
               for column in (options.anchor_column, options.positive_column)]
    pairs = Pairs([], [], [], where=", ".join(map(str, paths)))
    position: dict[str, int] = {}
    for anchor, positive in zip(*(read_records(paths, reader) for reader in readers), strict=True):
        if anchor.empty or positive.empty:
            pairs.skipped += 1
            continue
        pairs.anchors.append(anchor.text)
        pairs.positives.append(position.setdefault(positive.text, len(position)))
        if len(position) > len(pairs.corpus):
            pairs.corpus.append(positive.text)
    if not pairs.anchors:
        raise ValueError(f"{pairs.where}: no pairs with a non-empty {options.anchor_column!r} and "
                         f"{options.positive_column!r} to mine for.")
    return pairs


def rank_range(options: MiningOptions, pairs: Pairs) -> tuple[int, int]:
    """(range_min, range_max) checked against the corpus: an anchor has at most (distinct positives - 1)
    candidates, since its own positive is never one."""
    most = len(pairs.corpus) - 1
    top = min(DEFAULT_RANGE_MAX, most) if options.range_max is None else options.range_max
    if top > most or options.range_min >= most:
        flag = "--range-max" if options.range_max is not None and top > most else "--range-min"
        value = top if flag == "--range-max" else options.range_min
        raise ValueError(f"{flag} {value} is past the corpus: {pairs.where} has {len(pairs.corpus)} distinct "
                         f"positives, so an anchor has at most {most} candidates; give a range within 0..{most}.")
    return options.range_min, top


# -- selection ----------------------------------------------------------------------------------------------------
def select_negatives(scores: np.ndarray, positions: np.ndarray, excluded: set[int], positive_score: float,
                     options: MiningOptions, range_max: int) -> list[int]:
    """The corpus positions kept as negatives from one anchor's search results (best first; -1 = no result)."""
    kept: list[int] = []
    rank = 0
    for score, position in zip(scores.tolist(), positions.tolist(), strict=True):
        if position < 0 or position in excluded:
            continue
        rank += 1
        if rank <= options.range_min:
            continue
        if rank > range_max:
            break
        if options.margin is not None and not score < positive_score - options.margin:
            continue
        if options.max_score is not None and score > options.max_score:
            continue
        kept.append(position)
        if len(kept) == options.num_negatives:
            break
    return kept


# -- the run ------------------------------------------------------------------------------------------------------
@dataclass
class MiningResult:
    """What a run wrote: ``histogram`` maps a number of negatives to how many pairs got that many."""

    output: Path
    pairs: int
    rows: int
    histogram: dict[int, int]
    skipped: int = 0
    chunks_searched: list[int] = field(default_factory=list)
    chunks_kept: list[int] = field(default_factory=list)

    def histogram_line(self) -> str:
        counts = ", ".join(f"{n}: {self.histogram[n]}" for n in sorted(self.histogram))
        return f"pairs by negatives found: {counts or '-'}"

    def summary(self) -> str:
        skipped = f"; {self.skipped} pairs with an empty text skipped" if self.skipped else ""
        resumed = f" ({len(self.chunks_kept)} chunks kept from an earlier run)" if self.chunks_kept else ""
        return (f"Wrote {self.output}: {self.rows} rows for {self.pairs} pairs{resumed}{skipped}; "
                f"{self.histogram_line()}.")


def work_folder(output: str | os.PathLike) -> Path:
    """The resumable work folder beside ``output`` (``triplets.jsonl`` -> ``triplets.jsonl.mining/``)."""
    output = Path(output)
    return output.with_name(output.name + WORK_SUFFIX)


def _claim_work_folder(work: Path, job: dict) -> None:
    """Write job.json, or check that the folder's job is this one (its vectors would stand for other texts)."""
    previous = read_json(work / "job.json")
    if previous is None:
        if work.exists() and any(work.iterdir()):
            raise ValueError(f"Work folder {work} exists but holds no mining job: move it away, or choose another "
                             "--output.")
        atomic_write_json(work / "job.json", job)
    elif previous != job:
        changed = [key for key in job if previous.get(key) != job[key]]
        raise ValueError(f"Work folder {work} holds a mining run of another {' and '.join(changed)}: delete it to "
                         "start over, or choose another --output.")


def _write_corpus(path: Path, corpus: list[str]) -> None:
    text = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in corpus)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)


def prepare_index(embedder, pairs: Pairs, work: Path, options: MiningOptions,
                  model_spec: str | os.PathLike | None = None) -> Index:
    """Encode the distinct positives (documents, normalised) and index them, reusing what the folder holds."""
    _write_corpus(work / "corpus.jsonl", pairs.corpus)
    encode_corpus(embedder, [work / "corpus.jsonl"], work / "vectors", model_spec=model_spec,
                  reader=ReaderOptions(title_field=None), role="document", normalize=True,
                  batch_size=options.batch_size)
    build_index(work / "vectors", work / "index", BuildOptions(index_type=options.index_type, metric="ip"),
                texts=False)
    return Index.load(work / "index", embedder=embedder)


class _ChunkMiner:
    """Mines one chunk of pairs: encode its anchors as queries, search, select."""

    def __init__(self, index: Index, vectors: Path, pairs: Pairs, options: MiningOptions, range_max: int):
        self.index = index
        self.pairs = pairs
        self.options = options
        self.range_max = range_max
        self.excluded = pairs.excluded()
        self.source = VectorSource(open_vectors(vectors, verify=False))  # the positives' vectors, memory-mapped

    def mine(self, start: int, stop: int) -> list[list[int]]:
        anchors = self.pairs.anchors[start:stop]
        positives = np.asarray(self.pairs.positives[start:stop])
        queries = self.index.encode_queries(anchors, self.options.query_instruction)
        unique, inverse = np.unique(positives, return_inverse=True)
        positive_scores = np.einsum("ij,ij->i", queries, self.source.take(unique)[inverse])
        depth = self.range_max + max(len(self.excluded[a]) for a in anchors)
        scores, found = self.index.search_vectors(queries, min(depth, len(self.index)))
        return [select_negatives(scores[i], found[i], self.excluded[a], float(positive_scores[i]), self.options,
                                 self.range_max) for i, a in enumerate(anchors)]


def _progress_key(job: dict, options: MiningOptions, query_instruction: str | None) -> str:
    identity = {"job": job, "selection": options.selection(), "query_instruction": query_instruction}
    return json_digest(identity)


def mine_chunks(miner: _ChunkMiner, work: Path, key: str, result: MiningResult,
                on_chunk: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Every pair's negatives, chunk by chunk; finished chunks of this key are read back, the others mined and
    saved atomically before the next one starts."""
    size, total = miner.options.chunk_size, len(miner.pairs.anchors)
    negatives: list[list[int]] = []
    for number, start in enumerate(range(0, total, size)):
        path = work / "chunks" / f"chunk-{number:05d}.json"
        saved = read_json(path)
        if saved is not None and saved.get("key") == key and saved.get("start") == start:
            result.chunks_kept.append(number)
            negatives.extend(saved["negatives"])
            continue
        mined = miner.mine(start, min(start + size, total))
        atomic_write_json(path, {"key": key, "start": start, "negatives": mined}, indent=None)
        result.chunks_searched.append(number)
        negatives.extend(mined)
        if on_chunk is not None:
            on_chunk(number, -(-total // size))
    return negatives


def write_rows(output: Path, pairs: Pairs, negatives: list[list[int]], output_format: str) -> int:
    """The training file, atomically: one triplet per negative, or one n-tuple per pair that got any negative."""
    rows = 0
    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for anchor, positive, found in zip(pairs.anchors, pairs.positives, negatives, strict=True):
            base = {"anchor": anchor, "positive": pairs.corpus[positive]}
            if output_format == "n-tuple":
                out = [{**base, "negatives": [pairs.corpus[n] for n in found]}] if found else []
            else:
                out = [{**base, "negative": pairs.corpus[n]} for n in found]
            for row in out:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            rows += len(out)
    return rows


def mine_negatives(embedder, inputs: Sequence[str | os.PathLike], output: str | os.PathLike,
                   options: MiningOptions | None = None, *, model_spec: str | os.PathLike | None = None,
                   pairs: Pairs | None = None, on_chunk: Callable[[int, int], None] | None = None) -> MiningResult:
    """Mine hard negatives for the pairs in ``inputs`` and write ``output`` (see the module docstring).

    ``pairs``: already read by ``read_pairs`` (the CLI reads and checks them before loading the model).
    """
    options = options or MiningOptions()
    pairs = pairs if pairs is not None else read_pairs(inputs, options)
    _, range_max = rank_range(options, pairs)
    output = Path(output)
    work = work_folder(output)
    job = {"format": JOB_FORMAT, "version": 1, "model": embedder.fingerprint(),
           "input": [{"sha256": i["sha256"], "size": i["size"]} for i in describe_inputs(check_inputs(inputs))],
           "columns": [options.anchor_column, options.positive_column]}
    work.mkdir(parents=True, exist_ok=True)
    _claim_work_folder(work, job)
    index = prepare_index(embedder, pairs, work, options, model_spec)
    instruction = options.query_instruction
    if instruction is None:
        instruction = embedder.config.query_instruction or ""
    result = MiningResult(output, len(pairs.anchors), 0, {}, pairs.skipped)
    resolved = options.model_copy(update={"query_instruction": instruction})
    miner = _ChunkMiner(index, work / "vectors", pairs, resolved, range_max)
    negatives = mine_chunks(miner, work, _progress_key(job, options, instruction), result, on_chunk)
    result.rows = write_rows(output, pairs, negatives, options.output_format)
    result.histogram = dict(sorted(Counter(len(n) for n in negatives).items()))
    return result
