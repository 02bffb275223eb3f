"""Encode corpora into a sharded vectors folder: streaming, atomic, resumable, and split across processes.

Shards are fixed ranges of input rows (``shard_size`` rows each, empty rows included), so the layout does not
depend on how many processes run: under ``torchrun`` (or with ``RANK``/``WORLD_SIZE`` set, on one machine or
several sharing the output folder) process r encodes shards r, r+W, r+2W, ... The last process to finish writes
the manifest. A shard's files are renamed into place when complete and its metadata (with checksums) is written
last, so after a kill -9 a rerun keeps the verified shards and encodes the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedkit.corpus.job import CALIBRATION_FILE, JobOptions, calibration_ranges_for, describe_job
from embedkit.corpus.lock import LOCK_FILE, encode_lock
from embedkit.corpus.manifest import (
    JOB_FILE,
    MANIFEST_FILE,
    SHARDS_DIR,
    VECTOR_DTYPES,
    job_key,
    manifest_shard,
    shard_name,
    shard_paths,
    shard_problem,
    write_shard,
)
from embedkit.corpus.readers import ReaderOptions, Record, check_inputs, read_records
from embedkit.distributed import launch_rank
from embedkit.io import (
    atomic_write_json,
    read_json,
    remove_stale_temps,
)
from embedkit.quantization import SCALAR_PRECISIONS, check_precision, quantize

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 10_000


@dataclass
class EncodeResult:
    """What a run did; ``complete`` means the manifest exists (this process or another wrote it)."""

    output: Path
    rows: int
    shards_total: int
    shards_written: list[int] = field(default_factory=list)
    shards_kept: list[int] = field(default_factory=list)
    count: int | None = None
    skipped_empty: int | None = None
    complete: bool = False
    already_complete: bool = False
    seconds: float = 0.0

    def summary(self) -> str:
        if self.already_complete:
            return (f"Nothing to do: {self.output} is already complete ({self.count} vectors in "
                    f"{self.shards_total} shards, checksums verified).")
        done = (f"{len(self.shards_written)} shard(s) encoded, {len(self.shards_kept)} kept from an earlier run"
                f" (verified), in {self.seconds:.1f} s.")
        if self.complete:
            return (f"Wrote {self.output}: {self.count} vectors ({self.skipped_empty} empty rows skipped) in "
                    f"{self.shards_total} shards; {done}")
        return (f"{done} Other processes are still encoding; the last one to finish writes "
                f"{self.output / MANIFEST_FILE}.")


class _ShardWriter:
    """Encodes one shard's records and writes its files atomically, metadata last."""

    def __init__(self, embedder, folder: Path, job: dict, key: str, batch_size: int | None,
                 ranges: np.ndarray | None = None):
        self.embedder = embedder
        self.folder = folder
        self.job = job
        self.key = key
        self.batch_size = batch_size
        self.ranges = ranges  # int8/uint8 calibration (job.py), shared by every shard

    def write(self, number: int, records: list[Record]) -> dict:
        options = self.job["options"]
        keep = [r for r in records if not r.empty]
        vectors = self.embedder.encode([r.text for r in keep], instruction=options["instruction"],
                                       normalize=options["normalize"], batch_size=self.batch_size,
                                       show_progress_bar=False, dimensions=options.get("dimensions"))
        vectors = quantize(vectors, self.job["precision"], self.ranges)
        if vectors.dtype == np.float16 and not np.isfinite(vectors).all():
            raise ValueError(f"Shard {number}: vectors overflow float16 (un-normalised values above 65504); use "
                             "--vector-dtype float32.")
        remove_stale_temps(shard_paths(self.folder, number)[0].parent, shard_name(number))
        return write_shard(self.folder, number, vectors, [r.id for r in keep], job=self.key,
                           rows=[records[0].row, records[-1].row + 1],
                           skipped_ids=[r.id for r in records if r.empty])


def _finished_shard(folder: Path, number: int, key: str) -> dict | None:
    meta = read_json(shard_paths(folder, number)[2])
    if meta is None or meta.get("job") != key:
        return None
    problem = shard_problem(folder, meta)
    if problem:
        logger.warning("Shard %s will be encoded again: %s.", shard_name(number), problem)
        return None
    return meta


def _merge(folder: Path, job: dict, key: str) -> dict | None:
    """Write the manifest if every shard is finished; None if some are still missing (another process)."""
    metas = []
    for number in range(job["n_shards"]):
        meta = read_json(shard_paths(folder, number)[2])
        if meta is None or meta.get("job") != key:
            return None
        metas.append(meta)
    calibration = read_json(folder / CALIBRATION_FILE) if job["precision"] in SCALAR_PRECISIONS else None
    skipped = [i for m in metas for i in m["skipped_ids"]]
    manifest = {
        **{k: v for k, v in job.items() if k != "status"},
        "job": key,
        "count": sum(m["count"] for m in metas),
        "skipped_empty": len(skipped),
        "skipped_ids_sample": skipped[:20],
        **({"ranges": calibration["ranges"], "calibration_rows": calibration["rows"]} if calibration else {}),
        "shards": [manifest_shard(m) for m in metas],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(folder / MANIFEST_FILE, manifest)
    return manifest


def check_encode_options(vector_dtype: str = "float32", shard_size: int = DEFAULT_SHARD_SIZE,
                         batch_size: int | None = None, precision: str | None = None,
                         dimensions: int | None = None) -> None:
    """Refuse impossible options with one line (the CLI calls this before the model loads; ``dimensions`` is
    checked against the model's width once it is loaded)."""
    if vector_dtype not in VECTOR_DTYPES:
        raise ValueError(f"vector dtype must be one of {', '.join(VECTOR_DTYPES)}, got {vector_dtype!r}.")
    if precision is not None:
        check_precision(precision)
        if vector_dtype != "float32" and precision != vector_dtype:
            raise ValueError(f"Give precision={precision!r} or vector_dtype={vector_dtype!r}, not both (--precision "
                             "is the one name; --vector-dtype its older, float-only one).")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1):
        raise ValueError(f"dimensions must be at least 1, got {dimensions!r}: give the Matryoshka width to keep, "
                         "or none for the model's.")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}.")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch size must be at least 1, got {batch_size!r}: give a positive --batch-size, or "
                         "leave it unset for the model's own.")


def encode_corpus(
    embedder,
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    model_spec: str | os.PathLike | None = None,
    reader: ReaderOptions | None = None,
    role: str | None = None,
    instruction: str | None = None,
    normalize: bool | None = None,
    vector_dtype: str = "float32",
    precision: str | None = None,
    dimensions: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int | None = None,
    strict: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    on_shard: Callable[[int, dict], None] | None = None,
) -> EncodeResult:
    """Encode every row of ``inputs`` into ``output`` (see the module docstring for the layout and guarantees).

    ``role`` picks the embedder's document (default) or query instruction; ``instruction`` overrides it.
    ``precision`` stores float16 or quantized codes (``embedkit.quantization``; int8/uint8 calibrated once on a
    sample of the input); ``dimensions`` keeps the first N components (Matryoshka), renormalised.
    ``rank``/``world_size`` default to torchrun's environment. A folder holding another model's or input's
    vectors is refused; a finished one is verified and left alone. A single process holds the folder's
    encode lock (``corpus/lock.py``) for the whole run; torchrun ranks split the shards instead.
    """
    start = time.perf_counter()
    check_encode_options(vector_dtype, shard_size, batch_size, precision, dimensions)
    if rank is None or world_size is None:
        rank, world_size = launch_rank()
    paths = check_inputs(inputs)
    folder = Path(output)
    _refuse_foreign(folder)
    options = JobOptions(model_spec, reader or ReaderOptions(), role, instruction, normalize, vector_dtype,
                       shard_size, batch_size, strict, precision, dimensions)
    created = not folder.exists()
    try:
        with encode_lock(folder) if world_size == 1 else contextlib.nullcontext():
            result = _encode(embedder, paths, folder, options, rank, world_size, on_shard)
    except BaseException:
        if created:
            _remove_if_only_lock(folder)
        raise
    result.seconds = time.perf_counter() - start
    return result


def _refuse_foreign(folder: Path) -> None:
    """An existing output must be a folder holding an embedkit job, or empty (never someone else's files)."""
    if not folder.exists() or (folder / JOB_FILE).is_file():
        return
    if not folder.is_dir():
        raise ValueError(f"Output {folder} exists and is not a folder: choose another --output.")
    if any(p.name not in (SHARDS_DIR, LOCK_FILE) for p in folder.iterdir()):
        raise ValueError(f"Output folder {folder} is not empty and holds no embedkit job ({JOB_FILE}): "
                         "choose a new or empty --output folder.")


def _remove_if_only_lock(folder: Path) -> None:
    """A run that failed before writing anything leaves no folder behind (only its lock file would be there)."""
    with contextlib.suppress(OSError):
        if [p.name for p in folder.iterdir()] == [LOCK_FILE]:
            (folder / LOCK_FILE).unlink()
            folder.rmdir()


def _already_complete(folder: Path, key: str, result: EncodeResult) -> bool:
    """True (result filled in) if the folder's manifest is this job's and every shard verifies; a manifest
    with a bad shard is removed so the shard is encoded again."""
    manifest = read_json(folder / MANIFEST_FILE)
    if manifest is None or manifest.get("job") != key:
        return False
    bad = [(m["shard"], p) for m in manifest["shards"] if (p := shard_problem(folder, m))]
    if not bad:
        result.count, result.skipped_empty = manifest["count"], manifest["skipped_empty"]
        result.complete = result.already_complete = True
        result.shards_kept = [m["shard"] for m in manifest["shards"]]
        return True
    for number, problem in bad:
        logger.warning("Finished folder has a bad shard %s (%s): encoding it again.", shard_name(number), problem)
    (folder / MANIFEST_FILE).unlink(missing_ok=True)
    return False


def _encode(embedder, paths: list[Path], folder: Path, o: JobOptions, rank: int, world_size: int,
            on_shard: Callable[[int, dict], None] | None) -> EncodeResult:
    job, previous = describe_job(embedder, paths, folder, o)
    key = job_key(job)
    if previous != job:
        atomic_write_json(folder / JOB_FILE, job)  # every process writes the same content; rename is atomic
    (folder / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    result = EncodeResult(folder, job["rows"], job["n_shards"])
    if _already_complete(folder, key, result):
        return result
    todo = set()
    for number in range(rank, job["n_shards"], world_size):
        if _finished_shard(folder, number, key) is not None:
            result.shards_kept.append(number)
        else:
            todo.add(number)
    if todo:
        ranges = calibration_ranges_for(embedder, paths, folder, o, job, key)
        writer = _ShardWriter(embedder, folder, job, key, o.batch_size, ranges)
        _encode_shards(writer, paths, o, todo, result, on_shard)
    manifest = _merge(folder, job, key)
    if manifest is not None:
        result.complete = True
        result.count, result.skipped_empty = manifest["count"], manifest["skipped_empty"]
    return result


def _encode_shards(writer: _ShardWriter, paths: list[Path], o: JobOptions, todo: set[int], result: EncodeResult,
                   on_shard: Callable[[int, dict], None] | None) -> None:
    """One streaming pass over the input, encoding the rows of the shards in ``todo``."""
    current: int | None = None
    pending: list[Record] = []
    for record in read_records(paths, o.reader):
        number = record.row // o.shard_size
        if number != current:
            if pending:
                _write_shard(writer, current, pending, result, on_shard)
            current, pending = number, []
        if number in todo:
            pending.append(record)
    if pending:
        _write_shard(writer, current, pending, result, on_shard)
    missing = todo - set(result.shards_written)
    if missing:
        raise ValueError(f"The input now has fewer rows than when this job started (shards {sorted(missing)} "
                         "got no rows): the input changed; start over in a new --output folder.")


def _write_shard(writer: _ShardWriter, number: int, records: list[Record], result: EncodeResult,
                 on_shard: Callable[[int, dict], None] | None) -> None:
    began = time.perf_counter()
    meta = writer.write(number, records)
    result.shards_written.append(number)
    logger.info("%s: %d vectors (%d empty skipped) in %.1f s", shard_name(number), meta["count"],
                meta["skipped_empty"], time.perf_counter() - began)
    if on_shard is not None:
        on_shard(number, meta)
