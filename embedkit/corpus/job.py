"""What an encode job is: its identity (model, inputs' content, reader and options), checked against the job an
output folder already holds, and the first pass over the input that finds bad rows before anything is encoded."""

from __future__ import annotations

import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedkit.corpus.manifest import FORMAT, FORMAT_VERSION, JOB_FILE
from embedkit.corpus.readers import ReaderOptions, input_format, read_records
from embedkit.io import atomic_write_json, read_json, sha256_file
from embedkit.quantization import FLOAT_PRECISIONS, SCALAR_PRECISIONS, calibration_ranges, check_dimensions, code_dtype

ROLES = ("document", "query")


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


def describe_inputs(paths: Sequence[Path]) -> list[dict]:
    """Size, mtime and SHA-256 of every input. The hash is always computed (streamed): an edit that keeps the
    size and restores the mtime must still count as a change, or old vectors would stand for new texts."""
    out = []
    for path in paths:
        stat = path.stat()
        out.append({"path": str(path.resolve()), "format": input_format(path), "size": stat.st_size,
                    "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)})
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


def differences(old: dict, new: dict) -> list[str]:
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


@dataclass(frozen=True)
class JobOptions:
    """What encode_corpus was asked to do, besides the model, inputs and output."""

    model_spec: str | os.PathLike | None
    reader: ReaderOptions
    role: str | None
    instruction: str | None
    normalize: bool | None
    vector_dtype: str
    shard_size: int
    batch_size: int | None
    strict: bool
    precision: str | None = None  # None: vector_dtype's (float32 / float16)
    dimensions: int | None = None  # Matryoshka width; None: the model's

    @property
    def stored_precision(self) -> str:
        return self.precision or self.vector_dtype


def describe_job(embedder, paths: list[Path], folder: Path, o: JobOptions) -> tuple[dict, dict | None]:
    """(this run's job description, the folder's previous one); a different previous job is refused."""
    previous = read_json(folder / JOB_FILE)
    normalize = embedder.config.normalize if o.normalize is None else bool(o.normalize)
    precision = o.stored_precision
    width = check_dimensions(o.dimensions, embedder.dimension)
    job = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "model": {"spec": model_spec_for(o.model_spec, embedder), "fingerprint": embedder.fingerprint(),
                  "config": embedder.config.to_dict()},
        "dimension": width,
        "dtype": code_dtype(precision),
        "precision": precision,
        "normalized": normalize,
        "metric": "ip" if normalize else "l2",
        "pooling": embedder.config.pooling,
        "attention": embedder.config.attention,
        "inputs": describe_inputs(paths),
        "reader": o.reader.to_dict(),
        "options": {"role": o.role or "document", "instruction": resolve_instruction(embedder, o.role, o.instruction),
                    "normalize": normalize, "vector_dtype": code_dtype(precision), "shard_size": o.shard_size},
        "strict": o.strict,  # not part of the identity: it only decides whether empty rows are errors
    }
    # Keys only a non-default run has, so the identity (job_key) of folders from before them is unchanged.
    if precision not in FLOAT_PRECISIONS:
        job["options"]["precision"] = precision
    if width != embedder.dimension:
        job["options"]["dimensions"] = width
        job["model_dimension"] = embedder.dimension
    if previous is not None:
        problems = differences(previous, job)
        if problems:
            raise ValueError(f"Output folder {folder} already holds a different encode job; refusing to mix "
                             "vectors. Differences: " + "; ".join(problems) + ". Use a new --output folder, or "
                             "delete this one to start over.")
        job["rows"], job["empty_rows"], job["n_shards"] = previous["rows"], previous["empty_rows"], previous["n_shards"]
        if o.strict and job["empty_rows"]:
            raise ValueError(f"--strict: the input has {job['empty_rows']} empty rows (an earlier run without "
                             f"--strict skipped them; their ids are in {folder}/shards/*.json).")
    else:
        counts = scan(paths, o.reader, o.strict)
        job["rows"], job["empty_rows"] = counts["rows"], counts["empty"]
        job["n_shards"] = -(-counts["rows"] // o.shard_size)
    return job, previous


CALIBRATION_FILE = "calibration.json"
CALIBRATION_ROWS = 1000  # int8/uint8 encode: rows encoded once more to calibrate the ranges (spread over the input)


def calibration_ranges_for(embedder, paths: list[Path], folder: Path, o: JobOptions, job: dict,
                           key: str) -> np.ndarray | None:
    """The int8/uint8 ranges every shard of this job is quantized with (None for other precisions).

    Calibrated once on up to ``CALIBRATION_ROWS`` non-empty rows spread evenly over the input, and kept in
    ``calibration.json``: a resumed run and every torchrun rank use the first ranges written, never their own."""
    if job["precision"] not in SCALAR_PRECISIONS:
        return None
    path = folder / CALIBRATION_FILE
    saved = read_json(path)
    if saved is not None and saved.get("job") == key:
        return np.asarray(saved["ranges"], dtype=np.float32)
    wanted = set(np.linspace(0, job["rows"] - 1, min(job["rows"], CALIBRATION_ROWS)).round().astype(int).tolist())
    texts = [r.text for r in read_records(paths, o.reader) if r.row in wanted and not r.empty]
    options = job["options"]
    vectors = embedder.encode(texts, instruction=options["instruction"], normalize=options["normalize"],
                              batch_size=o.batch_size, dimensions=options.get("dimensions"), show_progress_bar=False)
    ranges = calibration_ranges(vectors)
    tmp = folder / f".{CALIBRATION_FILE}.{os.getpid()}"
    atomic_write_json(tmp, {"job": key, "rows": len(texts), "ranges": ranges.tolist()})
    try:
        if saved is not None:
            path.unlink(missing_ok=True)  # another job's ranges (the job itself was checked already)
        os.link(tmp, path)  # first writer wins: a rank that lost the race takes the winner's ranges
    except FileExistsError:
        return calibration_ranges_for(embedder, paths, folder, o, job, key)
    finally:
        tmp.unlink(missing_ok=True)
    return ranges
