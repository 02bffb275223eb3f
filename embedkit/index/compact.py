"""Compact index types (``--precision``): int8 codes (``int8_flat``), float16 (``fp16_flat``), and one bit per dimension
(``binary_flat``, ``binary_hnsw``), each one registry entry.

The codes are ``embedkit.quantization``'s, i.e. sentence-transformers' ``quantize_embeddings``: ``int8_flat`` is FAISS's
8-bit scalar quantizer (SQ8) whose ranges are set to ours (calibrated on a sample, or the int8 vectors folder's own) and
whose codes are added as computed by ``quantize``, so the index holds exactly sentence-transformers' uint8 codes
(int8 = uint8 - 128: the same buckets); queries stay float. The binary types hold ``x > 0`` bits and search by
Hamming distance. Their quality loss is won back by rescoring (``Index.search(rescore_multiplier=)``).
"""

from __future__ import annotations

import numpy as np

from embedkit.index.registry import IndexType, register_index_type
from embedkit.index.types import EF_CONSTRUCTION, EF_SEARCH, HNSW_M, TRAIN_SIZE, hnsw_params, set_ef_construction
from embedkit.quantization import SCALAR_PRECISIONS, calibration_ranges, quantize

SQ8_CALIBRATION_ROWS = 10_000  # int8_flat from float vectors: ranges from this many rows (or --train-size)
BINARY_RESCORE_MULTIPLIER = 4  # binary indexes rescore 4 x k candidates by default (bench/README.md)


# -- int8: FAISS's scalar quantizer with our ranges and our codes ----------------------------------------------
def _sq8_ranges(source, options) -> np.ndarray:
    vset = source.vset
    if vset is not None and vset.precision in SCALAR_PRECISIONS and source.dimension == source.stored_dimension:
        return vset.ranges  # the folder's codes are re-added unchanged (see _sq8_add)
    rows = min(source.count, options.train_size or SQ8_CALIBRATION_ROWS)
    sample = np.sort(np.random.default_rng(options.seed).choice(source.count, size=rows, replace=False))
    return calibration_ranges(source.take(sample))


def _sq8_train(index, source, options) -> dict:
    import faiss  # noqa: PLC0415

    ranges = _sq8_ranges(source, options)
    faiss.copy_array_to_vector(np.concatenate([ranges[0], ranges[1] - ranges[0]]).astype(np.float32),
                               index.sq.trained)
    index.is_trained = True
    return {"ranges": np.asarray(ranges, dtype=np.float32).tolist()}


def _sq8_add(index, source, facts: dict) -> None:
    """Add the codes ``quantize`` computes (FAISS's own encoder can round a boundary value the other way)."""
    vset, ranges = source.vset, np.asarray(facts["ranges"], dtype=np.float32)
    if vset is not None and vset.precision in SCALAR_PRECISIONS and source.dimension == source.stored_dimension:
        for _, codes in vset.iter_shards():
            raw = np.asarray(codes)
            index.add_sa_codes(raw.view(np.uint8) ^ 0x80 if raw.dtype == np.int8 else np.ascontiguousarray(raw))
        return
    for chunk in source.chunks():
        index.add_sa_codes(quantize(chunk, "uint8", ranges))


register_index_type(IndexType(
    name="int8_flat", factory=lambda count, dimension, options: ("SQ8", 0), params=(TRAIN_SIZE,),
    precisions=SCALAR_PRECISIONS, train=_sq8_train, add=_sq8_add, mmap=None,
    description="exact search over int8 codes (1 byte per dimension)",
))
register_index_type(IndexType(
    name="fp16_flat", factory=lambda count, dimension, options: ("SQfp16", 0), precisions=("float16",), mmap=None,
    description="exact search over float16 vectors",
))


# -- binary: FAISS's binary indexes behind the float interface ----------------------------------------------------
class BinaryIndex:
    """A FAISS binary index behind the float interface that build, calibration and search use: rows and queries
    are packed to ``x > 0`` bits on the way in; scores come back as ``bits - 2 * Hamming`` (the inner product of
    the +-1 sign vectors: higher is closer, as for ``ip``). Other attributes are the FAISS index's."""

    def __init__(self, index):
        self.index = index

    def __getattr__(self, name):
        return getattr(self.index, name)

    def train(self, rows: np.ndarray) -> None:
        self.index.train(quantize(rows, "ubinary"))

    def add(self, rows: np.ndarray) -> None:
        self.index.add(quantize(rows, "ubinary"))

    def search(self, queries: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        distances, labels = self.index.search(quantize(queries, "ubinary"), k, params=params)
        return (self.index.d - 2 * distances).astype(np.float32), labels


def _binary_create(dimension: int, factory: str, metric: str) -> BinaryIndex:
    import faiss  # noqa: PLC0415

    return BinaryIndex(faiss.index_binary_factory(-(-dimension // 8) * 8, factory))


def _binary_read(path: str, flags: int) -> BinaryIndex:
    import faiss  # noqa: PLC0415

    return BinaryIndex(faiss.read_index_binary(path, flags))


def _binary_write(index: BinaryIndex, path: str) -> None:
    import faiss  # noqa: PLC0415

    faiss.write_index_binary(index.index, path)


_BINARY = {"precisions": ("binary", "ubinary"), "create": _binary_create, "read": _binary_read,
           "write": _binary_write, "mmap": None, "rescore_multiplier": BINARY_RESCORE_MULTIPLIER}
register_index_type(IndexType(
    name="binary_flat", factory=lambda count, dimension, options: ("BFlat", 0),
    description="exact Hamming search over 1 bit per dimension, rescored with float vectors", **_BINARY,
))
register_index_type(IndexType(
    name="binary_hnsw", factory=lambda count, dimension, options: (f"BHNSW{options.hnsw_m}", 0),
    params=(HNSW_M, EF_CONSTRUCTION), knobs=(EF_SEARCH,), search_params=hnsw_params, prepare=set_ef_construction,
    description="HNSW graph over 1 bit per dimension, rescored with float vectors", **_BINARY,
))
