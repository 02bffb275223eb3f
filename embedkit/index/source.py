"""Rows to index: an in-memory array or a memory-mapped vectors folder, read a chunk at a time as float32; and exact
k-NN over them (the ground truth of calibration), with flat memory."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from embedkit.corpus.manifest import VectorSet
from embedkit.index.options import METRICS
from embedkit.quantization import BINARY_PRECISIONS, FLOAT_PRECISIONS, check_dimensions, truncate_dimensions


class VectorSource:
    """Rows to index, read in chunks as float32 (an in-memory array, or a memory-mapped vectors folder; quantized
    codes read back as floats), optionally cut to their first ``dimensions`` components (Matryoshka), renormalised
    when ``renormalize``."""

    def __init__(self, vectors, dimensions: int | None = None, renormalize: bool = True):
        self.vset = vectors if isinstance(vectors, VectorSet) else None
        if self.vset is None:
            array = np.asarray(vectors)
            if array.ndim != 2 or len(array) == 0:
                raise ValueError(f"Vectors must be a non-empty 2-D array, got shape {array.shape}.")
            self.array = array
            self.count, self.stored_dimension = array.shape
        else:
            self.count, self.stored_dimension = self.vset.count, self.vset.dimension
            if dimensions not in (None, self.stored_dimension) and self.vset.precision in BINARY_PRECISIONS:
                raise ValueError(f"--dimensions needs float or int8 vectors; {self.vset.folder} holds binary codes: "
                                 "encode with --dimensions instead.")
        self.dimension = check_dimensions(dimensions, self.stored_dimension)
        self.renormalize = renormalize

    def _float(self, rows: np.ndarray) -> np.ndarray:
        if self.vset is not None and self.vset.precision not in FLOAT_PRECISIONS:
            rows = self.vset.to_float(rows)
        if self.dimension != self.stored_dimension:
            rows = truncate_dimensions(np.asarray(rows, dtype=np.float32), self.dimension, self.renormalize)
        return np.ascontiguousarray(rows, dtype=np.float32)

    @classmethod
    def of(cls, vectors) -> VectorSource:
        """``vectors`` as a source; a source passes through (callers share one without re-reading it)."""
        return vectors if isinstance(vectors, cls) else cls(vectors)

    def chunks(self, rows: int = 65536) -> Iterator[np.ndarray]:
        if self.vset is None:
            for start in range(0, self.count, rows):
                yield self._float(self.array[start:start + rows])
            return
        for _, vectors in self.vset.iter_shards():
            for start in range(0, len(vectors), rows):
                yield self._float(vectors[start:start + rows])

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Rows at sorted ``positions`` as float32."""
        if self.vset is None:
            return self._float(self.array[positions])
        out, start = [], 0
        for _, vectors in self.vset.iter_shards():
            end = start + len(vectors)
            inside = positions[(positions >= start) & (positions < end)]
            if len(inside):
                out.append(self._float(vectors[inside - start]))
            start = end
        return np.ascontiguousarray(np.concatenate(out))

    def rows_in_order(self, order: np.ndarray) -> np.ndarray:
        """All rows as one float32 array with row ``order[i]`` at ``i``, filled a chunk at a time (one copy)."""
        rows = np.empty((self.count, self.dimension), dtype=np.float32)
        slot = np.empty_like(order)
        slot[order] = np.arange(len(order))
        start = 0
        for chunk in self.chunks():
            rows[slot[start:start + len(chunk)]] = chunk
            start += len(chunk)
        return rows


def faiss_metric(metric: str) -> int:
    import faiss  # noqa: PLC0415

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}.")
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def exact_knn(source, queries: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over all rows, a chunk at a time (flat memory); returns (scores, positions)."""
    import faiss  # noqa: PLC0415

    source = VectorSource.of(source)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    heap = faiss.ResultHeap(len(queries), k, keep_max=metric == "ip")
    start = 0
    for chunk in source.chunks():
        distances, labels = faiss.knn(queries, chunk, min(k, len(chunk)), metric=faiss_metric(metric))
        heap.add_result(distances, np.where(labels >= 0, labels + start, -1))
        start += len(chunk)
    heap.finalize()
    return heap.D, heap.I
