"""The index folder's files: ids, texts, checksums, and the checks that a folder is whole.

```
INDEX_DIR/
  index.faiss          the FAISS index; its labels are row positions 0..n-1 in the vectors folder's order
  ids.offsets.npy      position -> byte offset into ids.utf8.npy (n + 1 int64)
  ids.utf8.npy         the ids, concatenated UTF-8 (uint8): any id round-trips, a long one costs only itself
  texts.bin            the corpus texts, concatenated UTF-8 (only when the corpus files were found unchanged)
  texts.offsets.npy    position -> byte offset into texts.bin (n + 1 int64)
  vectors.json         the vectors folder's manifest: which model (spec + fingerprint) encoded the corpus
  index.json           type, FAISS factory string, metric, search parameters and their measured recall, checksums
```
Folders written before the offsets layout hold ``ids.npy`` (fixed-width UTF-8 bytes); they still load.

Checks (``index_problem``): ``"size"`` compares sizes only; ``"sample"`` (the default on load) also hashes each
file's header and a few blocks spread over it (the whole file when it is at most 4 MiB), which catches a zeroed
vector or swapped ids in small files and costs ~4 MiB of reads per file however large; ``"full"`` hashes every
byte (``index build``'s up-to-date check, ``embedkit index verify``, ``Index.load(verify=True)``).
"""

from __future__ import annotations

import hashlib
import mmap as _mmap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from embedkit.corpus.readers import ReaderOptions, read_records
from embedkit.io import atomic_path, atomic_save_npy, sha256_file

INDEX_FORMAT = "embedkit-index"
INDEX_VERSION = 1
IDS_OFFSETS, IDS_BYTES, OLD_IDS = "ids.offsets.npy", "ids.utf8.npy", "ids.npy"
SAMPLE_WHOLE = 4 << 20  # files up to this size are hashed whole by the "sample" check
SAMPLE_BLOCK = 64 << 10
SAMPLE_BLOCKS = 48
CHECKS = ("size", "sample", "full")


def load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    """A plain .npy array (memory-mapped); never unpickled: a pickled file is a one-line error naming it."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{path} is not a plain numeric .npy array ({err}); embedkit never unpickles: rebuild "
                         "the index with `embedkit index build`.") from None


# -- ids ---------------------------------------------------------------------------------------------------------
def write_ids(folder: Path, ids: Sequence[str]) -> None:
    """Ids as offsets + concatenated UTF-8 (two plain .npy files); a repeated id is an error."""
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        repeated = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(f"Id {repeated!r} appears twice in the vectors folder: ids must be unique.")
    encoded = [i.encode("utf-8") for i in ids]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    atomic_save_npy(folder / IDS_BYTES, np.frombuffer(b"".join(encoded), dtype=np.uint8))
    atomic_save_npy(folder / IDS_OFFSETS, offsets)


class StoredIds:
    """Position -> id of an index folder, memory-mapped (either layout)."""

    def __init__(self, folder: Path):
        if (folder / OLD_IDS).is_file() and not (folder / IDS_OFFSETS).is_file():
            self._fixed = load_npy(folder / OLD_IDS)
            if self._fixed.dtype.kind != "S":
                raise ValueError(f"{folder / OLD_IDS} holds {self._fixed.dtype} values, not ids: rebuild the index "
                                 "with `embedkit index build`.")
            self._offsets = self._bytes = None
        else:
            self._fixed = None
            self._offsets = load_npy(folder / IDS_OFFSETS)
            self._bytes = load_npy(folder / IDS_BYTES)

    def __len__(self) -> int:
        return len(self._fixed) if self._fixed is not None else len(self._offsets) - 1

    def __getitem__(self, position: int) -> str:
        if self._fixed is not None:
            return bytes(self._fixed[position]).decode("utf-8")
        start, end = int(self._offsets[position]), int(self._offsets[position + 1])
        return bytes(self._bytes[start:end]).decode("utf-8")


# -- texts -------------------------------------------------------------------------------------------------------
def corpus_unchanged(manifest: dict) -> str | None:
    """Why the corpus files cannot give the texts (moved, changed), or None if they can."""
    for item in manifest["inputs"]:
        path = Path(item["path"])
        if not path.is_file():
            return f"{path} is not there any more"
        stat = path.stat()
        changed = stat.st_mtime_ns != item["mtime_ns"] and sha256_file(path) != item["sha256"]
        if stat.st_size != item["size"] or changed:
            return f"{path} changed since it was encoded"
    return None


class _TextsMismatch(Exception):
    pass


def write_texts(folder: Path, manifest: dict, ids: Sequence[str]) -> str | None:
    """Store the corpus texts by position (streamed); returns why not, if they could not be stored."""
    problem = corpus_unchanged(manifest)
    if problem:
        return problem
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    position = 0
    try:
        with atomic_path(folder / "texts.bin") as tmp, open(tmp, "wb") as handle:
            reader = ReaderOptions(**manifest["reader"])
            for record in read_records([i["path"] for i in manifest["inputs"]], reader):
                if record.empty:
                    continue
                if position >= len(ids) or record.id != ids[position]:
                    raise _TextsMismatch(f"{record.where} (id {record.id!r}) does not line up with the vectors' ids")
                data = record.text.encode("utf-8")
                handle.write(data)
                offsets[position + 1] = offsets[position] + len(data)
                position += 1
            if position != len(ids):
                raise _TextsMismatch(f"the corpus gave {position} texts for {len(ids)} vectors")
    except _TextsMismatch as err:
        return str(err)
    atomic_save_npy(folder / "texts.offsets.npy", offsets)
    return None


def open_texts(folder: Path) -> tuple[np.ndarray, _mmap.mmap]:
    offsets = load_npy(folder / "texts.offsets.npy")
    with open(folder / "texts.bin", "rb") as handle:
        data = _mmap.mmap(handle.fileno(), 0, access=_mmap.ACCESS_READ) if handle.seek(0, 2) else b""
    return offsets, data


# -- checksums ---------------------------------------------------------------------------------------------------
def sample_digest(path: Path) -> str:
    """SHA-256 of the whole file up to 4 MiB; beyond, of its size, its first MiB and 48 blocks of 64 KiB spread
    evenly from start to end (the last one ends the file)."""
    size = path.stat().st_size
    if size <= SAMPLE_WHOLE:
        return sha256_file(path)
    digest = hashlib.sha256(f"{size}:".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        for i in range(SAMPLE_BLOCKS):
            handle.seek((size - SAMPLE_BLOCK) * i // (SAMPLE_BLOCKS - 1))
            digest.update(handle.read(SAMPLE_BLOCK))
    return "sample:" + digest.hexdigest()


def file_facts(folder: Path) -> dict:
    """Every file's size, SHA-256 and sample digest, for index.json."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p), "sample_sha256": sample_digest(p)}
            for p in sorted(folder.iterdir()) if p.is_file()}


def index_problem(folder: Path, info: dict, check: str = "sample") -> str | None:
    """What is wrong with the files ``index.json`` lists (missing, resized, changed), or None; ``check`` is one of
    ``CHECKS`` (see the module docstring). Folders from before sample digests get the size check on files over
    4 MiB (their smaller files are hashed whole)."""
    if check not in CHECKS:
        raise ValueError(f"check must be one of {', '.join(CHECKS)}, got {check!r}.")
    for name, facts in info.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != facts["bytes"]:
            return f"{path} has {size} bytes, index.json says {facts['bytes']}"
        if check == "full" and sha256_file(path) != facts["sha256"]:
            return f"{path} is corrupt (sha256 mismatch with index.json)"
        if check == "sample":
            expected = facts.get("sample_sha256") or (facts["sha256"] if size <= SAMPLE_WHOLE else None)
            if expected is not None and sample_digest(path) != expected:
                return f"{path} is corrupt (sha256 of its sampled blocks differs from index.json's)"
    return None
