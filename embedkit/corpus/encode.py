"""Encode corpora into a sharded vectors folder: streaming, atomic, resumable, and split across processes.

Shards are fixed ranges of input rows (``shard_size`` rows each, empty rows included), so the layout does not
depend on how many processes run: under ``torchrun`` (or with ``RANK``/``WORLD_SIZE`` set, on one machine or
several sharing the output folder) process r encodes shards r, r+W, r+2W, ... The last process to finish writes
the manifest. A shard's files are renamed into place when complete and its metadata (with checksums) is written
last, so after a kill -9 a rerun keeps the verified shards and encodes the rest.
"""

from __future__ import annotations

import json
import logging
import os
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedkit.corpus.manifest import (
    FORMAT,
    FORMAT_VERSION,
    JOB_FILE,
    MANIFEST_FILE,
    SHARDS_DIR,
    VECTOR_DTYPES,
    job_key,
    shard_name,
    shard_paths,
    shard_problem,
)
from embedkit.corpus.readers import ReaderOptions, Record, check_inputs, input_format, read_records
from embedkit.io import (
    atomic_save_npy,
    atomic_write_json,
    atomic_write_text,
    read_json,
    remove_stale_temps,
    sha256_file,
)

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 10_000
ROLES = ("document", "query")


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


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when not distributed."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"Bad distributed environment RANK={rank} WORLD_SIZE={world}.")
    return rank, world


def resolve_instruction(embedder, role: str | None, instruction: str | None) -> str | None:
    """An explicit instruction wins; else the embedder's instruction for the role (documents by default)."""
    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}.")
    if instruction is not None:
        return instruction or None
    cfg = embedder.config
    return cfg.query_instruction if role == "query" else cfg.document_instruction


def model_spec_for(spec: str | os.PathLike | None, embedder) -> str:
    """How to load the model again later (an absolute path for local folders/files, else the spec)."""
    spec = str(spec) if spec is not None else embedder.config.backbone
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def describe_inputs(paths: Sequence[Path], previous: list[dict] | None) -> list[dict]:
    """Size, mtime and SHA-256 of every input; the hash of an unchanged file (same size and mtime) is reused."""
    known = {(p["path"], p["size"], p["mtime_ns"]): p["sha256"] for p in previous or []}
    out = []
    for path in paths:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        digest = known.get(key) or sha256_file(path)
        out.append({"path": key[0], "format": input_format(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                    "sha256": digest})
    return out


def scan(paths: Sequence[Path], options: ReaderOptions, strict: bool) -> dict:
    """Read every row once before encoding, so bad input fails in seconds, not after hours: parse errors, a
    missing text field, empty texts under ``strict``, repeated ids. Memory: 8 bytes per row (id hashes)."""
    hashes = array("q")
    rows = empty = 0
    for record in read_records(paths, options):
        if record.empty:
            if strict:
                raise ValueError(f"{record.where}: empty text (id {record.id!r}); remove the row, or drop --strict "
                                 "to skip and count empty rows.")
            empty += 1
        hashes.append(hash(record.id))
        rows += 1
    if rows == 0:
        raise ValueError("The input has no rows: " + ", ".join(map(str, paths)) + ".")
    if rows == empty:
        raise ValueError(f"All {rows} rows have empty text: check --text-field (now {options.text_field!r}).")
    ordered = np.sort(np.frombuffer(hashes, dtype=np.int64))
    suspects = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if suspects:
        seen: dict[str, str] = {}
        for record in read_records(paths, options):
            if hash(record.id) in suspects:
                if record.id in seen:
                    raise ValueError(f"Id {record.id!r} repeats: {seen[record.id]} and {record.where}. Ids must be "
                                     "unique: fix the data, or leave --id-field unset to number rows instead.")
                seen[record.id] = record.where
    return {"rows": rows, "empty": empty}


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    if old["model"]["fingerprint"] != new["model"]["fingerprint"]:
        out.append(f"model: the folder has {old['model']['spec']} (fingerprint {old['model']['fingerprint']}), this "
                   f"run uses {new['model']['spec']} (fingerprint {new['model']['fingerprint']})")
    old_in = [(i["size"], i["sha256"]) for i in old["inputs"]]
    new_in = [(i["size"], i["sha256"]) for i in new["inputs"]]
    if old_in != new_in:
        out.append("input: the folder was encoded from " + ", ".join(i["path"] for i in old["inputs"])
                   + " with other contents than " + ", ".join(i["path"] for i in new["inputs"]) + " now")
    for section in ("reader", "options"):
        for key in sorted(set(old[section]) | set(new[section])):
            if old[section].get(key) != new[section].get(key):
                out.append(f"{key}: {old[section].get(key)!r} before, {new[section].get(key)!r} now")
    return out


class _ShardWriter:
    """Encodes one shard's records and writes its files atomically, metadata last."""

    def __init__(self, embedder, folder: Path, job: dict, key: str, batch_size: int | None):
        self.embedder = embedder
        self.folder = folder
        self.job = job
        self.key = key
        self.batch_size = batch_size

    def write(self, number: int, records: list[Record]) -> dict:
        options = self.job["options"]
        keep = [r for r in records if not r.empty]
        vectors = self.embedder.encode([r.text for r in keep], instruction=options["instruction"],
                                       normalize=options["normalize"], batch_size=self.batch_size,
                                       show_progress_bar=False)
        vectors = vectors.astype(options["vector_dtype"], copy=False)
        if options["vector_dtype"] == "float16" and not np.isfinite(vectors).all():
            raise ValueError(f"Shard {number}: vectors overflow float16 (un-normalised values above 65504); use "
                             "--vector-dtype float32.")
        vec_path, ids_path, meta_path = shard_paths(self.folder, number)
        remove_stale_temps(vec_path.parent, shard_name(number))
        atomic_save_npy(vec_path, vectors)
        atomic_write_text(ids_path, json.dumps([r.id for r in keep], ensure_ascii=False))
        meta = {
            "shard": number, "job": self.key,
            "rows": [records[0].row, records[-1].row + 1],
            "count": len(keep), "skipped_empty": len(records) - len(keep),
            "skipped_ids": [r.id for r in records if r.empty],
            "vectors": vec_path.name, "ids": ids_path.name,
            "shape": list(vectors.shape), "dtype": str(vectors.dtype),
            "bytes": {"vectors": vec_path.stat().st_size, "ids": ids_path.stat().st_size},
            "sha256": {"vectors": sha256_file(vec_path), "ids": sha256_file(ids_path)},
        }
        atomic_write_json(meta_path, meta)
        return meta


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
    skipped = [i for m in metas for i in m["skipped_ids"]]
    manifest = {
        **{k: v for k, v in job.items() if k != "status"},
        "job": key,
        "count": sum(m["count"] for m in metas),
        "skipped_empty": len(skipped),
        "skipped_ids_sample": skipped[:20],
        "shards": [{k: m[k] for k in ("shard", "rows", "count", "vectors", "ids", "shape", "dtype", "bytes", "sha256")}
                   for m in metas],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(folder / MANIFEST_FILE, manifest)
    return manifest


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
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int | None = None,
    strict: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    on_shard: Callable[[int, dict], None] | None = None,
) -> EncodeResult:
    """Encode every row of ``inputs`` into ``output`` (see the module docstring for the layout and guarantees).

    ``role`` picks the embedder's document (default) or query instruction; ``instruction`` overrides it.
    ``rank``/``world_size`` default to torchrun's environment. A folder holding another model's or input's
    vectors is refused; a finished one is verified and left alone.
    """
    start = time.perf_counter()
    if vector_dtype not in VECTOR_DTYPES:
        raise ValueError(f"vector dtype must be one of {', '.join(VECTOR_DTYPES)}, got {vector_dtype!r}.")
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}.")
    if rank is None or world_size is None:
        rank, world_size = distributed_rank()
    paths = check_inputs(inputs)
    reader = reader or ReaderOptions()
    folder = Path(output)
    normalize = embedder.config.normalize if normalize is None else bool(normalize)

    previous = read_json(folder / JOB_FILE)
    if previous is None and folder.exists():
        if not folder.is_dir():
            raise ValueError(f"Output {folder} exists and is not a folder: choose another --output.")
        if any(p.name != SHARDS_DIR for p in folder.iterdir()):
            raise ValueError(f"Output folder {folder} is not empty and holds no embedkit job ({JOB_FILE}): "
                             "choose a new or empty --output folder.")
    job = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "model": {"spec": model_spec_for(model_spec, embedder), "fingerprint": embedder.fingerprint(),
                  "config": embedder.config.to_dict()},
        "dimension": embedder.dimension,
        "dtype": vector_dtype,
        "normalized": normalize,
        "metric": "ip" if normalize else "l2",
        "pooling": embedder.config.pooling,
        "attention": embedder.config.attention,
        "inputs": describe_inputs(paths, previous["inputs"] if previous else None),
        "reader": reader.to_dict(),
        "options": {"role": role or "document", "instruction": resolve_instruction(embedder, role, instruction),
                    "normalize": normalize, "vector_dtype": vector_dtype, "shard_size": shard_size},
        "strict": strict,  # not part of the identity: it only decides whether empty rows are errors
    }
    if previous is not None:
        problems = _differences(previous, job)
        if problems:
            raise ValueError(f"Output folder {folder} already holds a different encode job; refusing to mix "
                             "vectors. Differences: " + "; ".join(problems) + ". Use a new --output folder, or "
                             "delete this one to start over.")
        job["rows"], job["empty_rows"], job["n_shards"] = previous["rows"], previous["empty_rows"], previous["n_shards"]
        if strict and job["empty_rows"]:
            raise ValueError(f"--strict: the input has {job['empty_rows']} empty rows (an earlier run without "
                             f"--strict skipped them; their ids are in {folder}/shards/*.json).")
    else:
        counts = scan(paths, reader, strict)
        job["rows"], job["empty_rows"] = counts["rows"], counts["empty"]
        job["n_shards"] = -(-counts["rows"] // shard_size)
    key = job_key(job)
    if previous != job:
        atomic_write_json(folder / JOB_FILE, job)  # every process writes the same content; rename is atomic
    (folder / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    result = EncodeResult(folder, job["rows"], job["n_shards"])

    manifest = read_json(folder / MANIFEST_FILE)
    if manifest is not None and manifest.get("job") == key:
        bad = [(m["shard"], p) for m in manifest["shards"] if (p := shard_problem(folder, m))]
        if not bad:
            result.count, result.skipped_empty = manifest["count"], manifest["skipped_empty"]
            result.complete = result.already_complete = True
            result.shards_kept = [m["shard"] for m in manifest["shards"]]
            return result
        for number, problem in bad:
            logger.warning("Finished folder has a bad shard %s (%s): encoding it again.", shard_name(number), problem)
        (folder / MANIFEST_FILE).unlink(missing_ok=True)

    mine = [n for n in range(job["n_shards"]) if n % world_size == rank]
    todo = set()
    for number in mine:
        if _finished_shard(folder, number, key) is not None:
            result.shards_kept.append(number)
        else:
            todo.add(number)
    if todo:
        writer = _ShardWriter(embedder, folder, job, key, batch_size)
        current: int | None = None
        pending: list[Record] = []
        for record in read_records(paths, reader):
            number = record.row // shard_size
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
    manifest = _merge(folder, job, key)
    if manifest is not None:
        result.complete = True
        result.count, result.skipped_empty = manifest["count"], manifest["skipped_empty"]
    result.seconds = time.perf_counter() - start
    return result


def _write_shard(writer: _ShardWriter, number: int, records: list[Record], result: EncodeResult,
                 on_shard: Callable[[int, dict], None] | None) -> None:
    began = time.perf_counter()
    meta = writer.write(number, records)
    result.shards_written.append(number)
    logger.info("%s: %d vectors (%d empty skipped) in %.1f s", shard_name(number), meta["count"],
                meta["skipped_empty"], time.perf_counter() - began)
    if on_shard is not None:
        on_shard(number, meta)
