"""Rescoring: the candidates a compact index found, reordered by the float query x their stored vectors.

A binary (or int8) index finds ``rescore_multiplier x k`` candidates cheaply; their exact scores come from the vectors
folder the index was built from (memory-mapped, so only the candidates' rows are read): float32/float16 rows as they
are, int8 codes read back as sentence-transformers rescores them, cut to the index's Matryoshka width.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from embedkit.corpus.manifest import open_vectors
from embedkit.quantization import FLOAT_PRECISIONS, truncate_dimensions

logger = logging.getLogger(__name__)


def check_multiplier(value) -> int | None:
    """A ``rescore_multiplier`` given to a search (None = the index's default), or a one-line error."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"rescore_multiplier (--rescore-multiplier) must be an integer of at least 0 (0 = no "
                         f"rescoring), got {value!r}.")
    return value


class RescoreVectors:
    """Rows of the vectors folder an index was built from, by position, as float32 at the index's width."""

    def __init__(self, info: dict):
        folder = info.get("vectors_dir")
        if folder is None or not Path(folder).is_dir():
            raise FileNotFoundError(f"Rescoring reads the vectors folder the index was built from ({folder}), which "
                                    "is not there: put it back, or search with rescore_multiplier=0.")
        self.vset = open_vectors(folder, verify=False)
        manifest, source = self.vset.manifest, info["source"]
        if (manifest["job"], manifest["finished"]) != (source["job"], source["finished"]):
            raise ValueError(f"The vectors folder {folder} changed since the index was built from it: rebuild the "
                             "index, or search with rescore_multiplier=0.")
        self.shards = [vectors for _, vectors in self.vset.iter_shards()]  # memory maps
        self.starts = np.cumsum([0] + [len(v) for v in self.shards])
        self.width = int(info["dimension"])
        self.renormalize = bool(manifest["normalized"])

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """float32 rows at ``positions`` (any order), each shard's rows read in ascending order."""
        out = np.empty((len(positions), self.vset.dimension), dtype=np.float32)
        shard_of = np.searchsorted(self.starts, positions, side="right") - 1
        for shard in np.unique(shard_of):
            where = np.flatnonzero(shard_of == shard)
            local = positions[where] - self.starts[shard]
            order = np.argsort(local)
            rows = self.shards[shard][local[order]]
            if self.vset.precision not in FLOAT_PRECISIONS:
                rows = self.vset.to_float(rows)
            out[where[order]] = rows
        return truncate_dimensions(out, self.width, self.renormalize)


def rescore(queries: np.ndarray, labels: np.ndarray, vectors: RescoreVectors, k: int,
            metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` of each query's candidate ``labels`` (-1 = none) by float score: inner product for ``ip``
    (highest first), squared L2 distance for ``l2`` (lowest first); -1 / -inf-like padding where fewer."""
    scores = np.full((len(queries), k), -np.inf if metric == "ip" else np.inf, dtype=np.float32)
    found = np.full((len(queries), k), -1, dtype=np.int64)
    valid = labels >= 0
    if not valid.any():
        return scores, found
    unique, inverse = np.unique(labels[valid], return_inverse=True)  # labels[valid] is row-major
    rows = vectors.rows(unique)
    ends = np.cumsum(valid.sum(axis=1))
    for q, query in enumerate(np.asarray(queries, dtype=np.float32)):
        mine = inverse[(ends[q - 1] if q else 0):ends[q]]
        cand = rows[mine]
        values = cand @ query if metric == "ip" else ((cand - query) ** 2).sum(axis=1)
        order = np.argsort(-values if metric == "ip" else values, kind="stable")[:k]
        scores[q, :len(order)] = values[order]
        found[q, :len(order)] = unique[mine[order]]
    return scores, found
