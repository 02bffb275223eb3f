"""The vectors folder: layout, shard metadata, checksums, and reading it back (memory-mapped).

```
VECTORS_DIR/
  job.json                 what is being encoded (model fingerprint, inputs' checksums, options); written first
  calibration.json         int8/uint8 only: the ranges every shard is quantized with (first writer wins)
  shards/shard-00000.npy   (n, d) float32/float16 vectors or int8/uint8 codes, (n, d/8) binary codes; mmap-able
  shards/shard-00000.ids.json   the n ids, in row order (JSON: never pickle)
  shards/shard-00000.json  shard metadata + checksums; written last, so its presence means the shard is whole
  manifest.json            the finished job: everything in job.json + counts + every shard; written at the end
```
The manifest's ``dimension`` is the stored width (a Matryoshka ``--dimensions`` run also records the model's own
``model_dimension``), ``precision`` what the shards hold (absent in folders from before it: their ``dtype``),
``ranges`` the int8/uint8 calibration (``embedkit.quantization``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedkit.io import atomic_save_npy, atomic_write_json, atomic_write_text, json_digest, read_json, sha256_file
from embedkit.quantization import FLOAT_PRECISIONS, dequantize

FORMAT = "embedkit-vectors"
FORMAT_VERSION = 1
JOB_FILE = "job.json"
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
VECTOR_DTYPES = ("float32", "float16")


def shard_name(number: int) -> str:
    return f"shard-{number:05d}"


def shard_paths(folder: Path, number: int) -> tuple[Path, Path, Path]:
    """(vectors .npy, ids .json, meta .json) of shard ``number``."""
    base = Path(folder) / SHARDS_DIR / shard_name(number)
    return base.with_suffix(".npy"), base.with_name(base.name + ".ids.json"), base.with_suffix(".json")


def write_shard(folder: Path, number: int, vectors: np.ndarray, ids: list[str], *, job: str, rows: list[int],
                skipped_ids: list[str]) -> dict:
    """Write shard ``number``'s vectors and ids, then its metadata (last: its presence means the shard is whole)."""
    vec_path, ids_path, meta_path = shard_paths(folder, number)
    atomic_save_npy(vec_path, vectors)
    atomic_write_text(ids_path, json.dumps(ids, ensure_ascii=False))
    meta = {
        "shard": number, "job": job, "rows": rows,
        "count": len(ids), "skipped_empty": len(skipped_ids), "skipped_ids": skipped_ids,
        "vectors": vec_path.name, "ids": ids_path.name,
        "shape": list(vectors.shape), "dtype": str(vectors.dtype),
        "bytes": {"vectors": vec_path.stat().st_size, "ids": ids_path.stat().st_size},
        "sha256": {"vectors": sha256_file(vec_path), "ids": sha256_file(ids_path)},
    }
    atomic_write_json(meta_path, meta)
    return meta


def manifest_shard(meta: dict) -> dict:
    """What the manifest keeps of a shard's metadata (not the job key or the skipped ids)."""
    return {k: meta[k] for k in ("shard", "rows", "count", "vectors", "ids", "shape", "dtype", "bytes", "sha256")}


def job_key(job: dict) -> str:
    """A short hash of a job's identity; shards carry it so a shard of another job is never taken as ours."""
    identity = {k: job[k] for k in ("model", "inputs", "reader", "options")}
    identity["inputs"] = [{"sha256": i["sha256"], "size": i["size"]} for i in job["inputs"]]
    identity["model"] = {"fingerprint": job["model"]["fingerprint"]}
    return json_digest(identity)


def shard_problem(folder: Path, meta: dict, check_sums: bool = True) -> str | None:
    """Why a finished shard cannot be trusted (missing file, wrong size, checksum mismatch), or None if sound."""
    vectors, ids, _ = shard_paths(folder, meta["shard"])
    for kind, path in (("vectors", vectors), ("ids", ids)):
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != meta["bytes"][kind]:
            return f"{path} has {path.stat().st_size} bytes, the shard metadata says {meta['bytes'][kind]}"
        if check_sums and sha256_file(path) != meta["sha256"][kind]:
            return f"{path} is corrupt (sha256 mismatch with its shard metadata)"
    return None


@dataclass
class VectorSet:
    """A finished vectors folder. Shards are memory-mapped, so opening a huge one costs nothing."""

    folder: Path
    manifest: dict

    @property
    def dimension(self) -> int:
        return int(self.manifest["dimension"])

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def metric(self) -> str:
        return self.manifest["metric"]

    @property
    def precision(self) -> str:
        return self.manifest.get("precision", self.manifest["dtype"])

    @property
    def model_dimension(self) -> int:
        """The encoding model's width (larger than ``dimension`` when the vectors were cut to Matryoshka dims)."""
        return int(self.manifest.get("model_dimension", self.dimension))

    @property
    def ranges(self) -> np.ndarray | None:
        """The int8/uint8 calibration ranges (2, d), or None."""
        ranges = self.manifest.get("ranges")
        return None if ranges is None else np.asarray(ranges, dtype=np.float32)

    def to_float(self, codes: np.ndarray) -> np.ndarray:
        """Stored rows as float32 (quantized codes read back as sentence-transformers rescores them)."""
        return dequantize(codes, self.precision, self.dimension, self.ranges)

    def __len__(self) -> int:
        return self.count

    def iter_shards(self) -> Iterator[tuple[list[str], np.ndarray]]:
        """(ids, vectors) per shard in order; vectors are read-only memory maps in the stored dtype."""
        for meta in self.manifest["shards"]:
            vectors, ids, _ = shard_paths(self.folder, meta["shard"])
            yield json.loads(ids.read_text(encoding="utf-8")), np.load(vectors, mmap_mode="r", allow_pickle=False)

    def ids(self) -> list[str]:
        return [i for ids, _ in self.iter_shards() for i in ids]

    def load(self, dtype: str = "float32") -> np.ndarray:
        """All vectors as one in-memory array (count x dimension); quantized codes are read back as floats."""
        out = np.empty((self.count, self.dimension), dtype=dtype)
        start = 0
        for _, vectors in self.iter_shards():
            out[start:start + len(vectors)] = vectors if self.precision in FLOAT_PRECISIONS else self.to_float(vectors)
            start += len(vectors)
        return out


def open_vectors(folder: str | os.PathLike, verify: bool = True) -> VectorSet:
    """Open a finished vectors folder; ``verify`` checks every shard's checksum and names a bad one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Vectors folder {folder} does not exist: run `embedkit encode` first.")
    manifest = read_json(folder / MANIFEST_FILE)
    if manifest is None:
        hint = ("the encode has not finished: rerun the same `embedkit encode` command to resume it"
                if (folder / JOB_FILE).is_file() else "it is not an `embedkit encode` output folder")
        raise FileNotFoundError(f"{folder} has no {MANIFEST_FILE}: {hint}.")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{folder / MANIFEST_FILE} is not an embedkit vectors manifest (format "
                         f"{manifest.get('format')!r}).")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{folder} was written by a newer embedkit (format version {manifest['version']}); "
                         "upgrade embedkit.")
    for meta in manifest["shards"]:
        problem = shard_problem(folder, meta, check_sums=verify)
        if problem:
            raise ValueError(f"Shard {shard_name(meta['shard'])} of {folder} is not usable: {problem}. Rerun the "
                             "`embedkit encode` command that made this folder: it re-encodes only that shard.")
    return VectorSet(folder, manifest)


def write_vectors_folder(folder: str | os.PathLike, vectors: np.ndarray, job: str = "synthetic") -> Path:
    """A finished one-shard float32 vectors folder of unit-length ``vectors`` (ids ``v0``, ``v1``, ...), as
    ``embedkit encode`` lays it out: for vectors that come from no model (synthetic benchmarks, tests)."""
    folder = Path(folder)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    (folder / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    meta = write_shard(folder, 0, vectors, [f"v{i}" for i in range(len(vectors))], job=job, rows=[0, len(vectors)],
                       skipped_ids=[])
    atomic_write_json(folder / MANIFEST_FILE, {
        "format": FORMAT, "version": FORMAT_VERSION, "job": job, "finished": "now",
        "model": {"spec": job, "fingerprint": job, "config": {}}, "dimension": vectors.shape[1],
        "dtype": "float32", "precision": "float32", "normalized": True, "metric": "ip", "count": len(vectors),
        "skipped_empty": 0, "inputs": [], "reader": {}, "options": {}, "shards": [manifest_shard(meta)]})
    return folder
