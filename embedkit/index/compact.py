"""Compact index types (``--precision``): int8 codes (``int8_flat``), float16 (``fp16_flat``), and one bit per dimension
(``binary_flat``, ``binary_hnsw``), each one registry entry.

The codes are ``embedkit.quantization``'s, i.e. sentence-transformers' ``quantize_embeddings``: ``int8_flat`` is FAISS's
8-bit scalar quantizer (SQ8) whose ranges are set to ours (calibrated on a sample, or the int8 vectors folder's own) and
whose codes are added as computed by ``quantize``, so the index holds exactly sentence-transformers' uint8 codes
(int8 = uint8 - 128: the same buckets); queries stay float. The binary types hold sentence-transformers' bits of
``(x - t) @ R`` and search by Hamming distance, queries transformed the same way: ``t`` per-dimension thresholds
(``--binary-threshold`` zero, or the corpus mean or median calibrated on a sample like the int8 ranges) and ``R`` a
seeded random rotation (``--binary-rotation``), both recorded in ``index.json`` and restored on load. By default the
rows are centred (mean) and rotated: LLM vectors put much of their variance in a few outlier dimensions, which plain
``x > 0`` bits weigh like any other (bench/README.md has the recall measured). Their quality loss is won back by
rescoring (``Index.search(rescore_multiplier=)``).
"""

from __future__ import annotations

import numpy as np

from embedkit.index.registry import IndexType, register_index_type
from embedkit.index.types import EF_CONSTRUCTION, EF_SEARCH, HNSW_M, TRAIN_SIZE, hnsw_params, set_ef_construction
from embedkit.quantization import (
    BINARY_PRECISIONS,
    CALIBRATION_ROWS,
    SCALAR_PRECISIONS,
    binary_thresholds,
    calibration_ranges,
    check_binary_threshold,
    quantize,
    random_rotation,
)

BINARY_RESCORE_MULTIPLIER = 20  # binary types rescore at least this deep; build calibrates deeper (calibrate.py)
DEFAULT_BINARY_THRESHOLD = "mean"  # binary_threshold unset, over float or int8 vectors (bench/README.md)
DEFAULT_BINARY_ROTATION = True  # binary_rotation unset, over float or int8 vectors (bench/README.md)
ROTATION_PROBE = 8  # index.json keeps the rotation's first entries: a load that regenerates another one fails


def _sample(source, options) -> np.ndarray:
    """The calibration sample: up to ``--train-size`` (default 10,000) rows drawn with the build's seed."""
    rows = min(source.count, options.train_size or CALIBRATION_ROWS)
    return source.take(np.sort(np.random.default_rng(options.seed).choice(source.count, size=rows, replace=False)))


# -- int8: FAISS's scalar quantizer with our ranges and our codes ----------------------------------------------
def _sq8_ranges(source, options) -> np.ndarray:
    vset = source.vset
    if vset is not None and vset.precision in SCALAR_PRECISIONS and source.dimension == source.stored_dimension:
        return vset.ranges  # the folder's codes are re-added unchanged (see _sq8_add)
    return calibration_ranges(_sample(source, options))


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
    are packed to the bits of ``(x - thresholds) @ rotation`` on the way in (``None``: left out, so plain
    ``x > 0``); scores come back as ``bits - 2 * Hamming`` (the inner product of the +-1 sign vectors: higher is
    closer, as for ``ip``). Other attributes are the FAISS index's."""

    def __init__(self, index, thresholds: np.ndarray | None = None, rotation: np.ndarray | None = None):
        self.index = index
        self.thresholds = thresholds
        self.rotation = rotation

    def __getattr__(self, name):
        return getattr(self.index, name)

    @property
    def rotation(self) -> np.ndarray | None:
        return self._rotation

    @rotation.setter
    def rotation(self, matrix: np.ndarray | None) -> None:
        """Kept as a FAISS ``LinearTransform`` too: applied with numpy's BLAS, whose threads contend with FAISS's
        OpenMP threads between searches, a 43-query batch ran 30x slower (bench/README.md)."""
        import faiss  # noqa: PLC0415

        self._rotation, self._transform = matrix, None
        if matrix is not None:
            self._transform = faiss.LinearTransform(matrix.shape[0], matrix.shape[1], False)
            faiss.copy_array_to_vector(np.ascontiguousarray(matrix.T, dtype=np.float32).ravel(), self._transform.A)
            self._transform.is_trained = True

    def bits(self, rows: np.ndarray) -> np.ndarray:
        """Packed uint8 bits of float rows: sentence-transformers' ``ubinary`` of the transformed rows."""
        rows = np.asarray(rows, dtype=np.float32)
        if self.thresholds is not None:
            rows = rows - self.thresholds
        if self._transform is not None:
            rows = self._transform.apply(np.ascontiguousarray(rows))
        return quantize(rows, "ubinary")

    def train(self, rows: np.ndarray) -> None:
        self.index.train(self.bits(rows))

    def add(self, rows: np.ndarray) -> None:
        self.index.add(self.bits(rows))

    def search(self, queries: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        distances, labels = self.index.search(self.bits(queries), k, params=params)
        return (self.index.d - 2 * distances).astype(np.float32), labels


def _binary_transform(source, options) -> tuple[str, bool]:
    """(threshold, rotation) to use: the options, or the defaults (none over a folder of binary codes: its bits are
    fixed); a transform asked for over binary codes is a one-line error."""
    vset = source.vset
    codes = vset is not None and vset.precision in BINARY_PRECISIONS
    name = options.binary_threshold or ("zero" if codes else DEFAULT_BINARY_THRESHOLD)
    rotate = (not codes and DEFAULT_BINARY_ROTATION) if options.binary_rotation is None else options.binary_rotation
    if codes and (check_binary_threshold(name) != "zero" or rotate):
        asked = f"binary_threshold {name}" if name != "zero" else "binary_rotation"
        raise ValueError(f"{asked} needs float or int8 vectors, but {vset.folder} holds binary codes (their bits are "
                         "x > 0 already): encode with another --precision, or use binary_threshold zero without "
                         "binary_rotation.")
    return name, rotate


def _binary_train(index: BinaryIndex, source, options) -> dict:
    """Calibrate the thresholds on a sample (none for ``zero``) and draw the rotation from the build's seed; recorded
    in index.json (the rotation by its seed) and restored on load."""
    name, rotate = _binary_transform(source, options)
    facts: dict = {"binary_threshold": name, "binary_rotation": None}
    if name != "zero":
        index.thresholds = binary_thresholds(_sample(source, options), name)
        facts["thresholds"] = index.thresholds.tolist()
    if rotate:
        index.rotation = random_rotation(source.dimension, options.seed)
        facts["binary_rotation"] = {"seed": options.seed, "probe": index.rotation[0, :ROTATION_PROBE].tolist()}
    return facts


def _binary_restore(index: BinaryIndex, info: dict) -> None:
    """The transform index.json records; folders from before it (and ``zero`` without rotation) take ``x > 0``."""
    thresholds, rotation = info.get("thresholds"), info.get("binary_rotation")
    index.thresholds = None if thresholds is None else np.asarray(thresholds, dtype=np.float32)
    index.rotation = None
    if rotation:
        index.rotation = random_rotation(int(info["dimension"]), int(rotation["seed"]))
        probe = np.asarray(rotation["probe"], dtype=np.float32)
        if not np.allclose(index.rotation[0, :len(probe)], probe, atol=1e-5):
            raise ValueError(f"This machine draws another rotation from seed {rotation['seed']} than the one the "
                             "binary index was built with: rebuild the index here.")


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
           "write": _binary_write, "train": _binary_train, "restore": _binary_restore, "mmap": None,
           "rescore_multiplier": BINARY_RESCORE_MULTIPLIER}
register_index_type(IndexType(
    name="binary_flat", factory=lambda count, dimension, options: ("BFlat", 0), params=(TRAIN_SIZE,),
    description="exact Hamming search over 1 bit per dimension, rescored with float vectors", **_BINARY,
))
register_index_type(IndexType(
    name="binary_hnsw", factory=lambda count, dimension, options: (f"BHNSW{options.hnsw_m}", 0),
    params=(HNSW_M, EF_CONSTRUCTION, TRAIN_SIZE), knobs=(EF_SEARCH,), search_params=hnsw_params,
    prepare=set_ef_construction,
    description="HNSW graph over 1 bit per dimension, rescored with float vectors", **_BINARY,
))
