"""Vector widths and precisions: Matryoshka truncation, and quantized codes with sentence-transformers' semantics.

A core module because the corpus (encode shards), the index (compact indexes, rescoring) and the server all use it.
The codes equal ``sentence_transformers.quantization.quantize_embeddings`` on the same input and ranges (tested):

- ``int8`` / ``uint8``: per-dimension ranges ``[min; max]`` calibrated on a sample, 256 buckets of
  ``(max - min) / 255``; a value's code is ``floor((x - min) / step)`` clipped to 0..255 (minus 128 for int8);
- ``binary`` / ``ubinary``: one bit per dimension (``x > 0``), packed 8 to a byte (``binary`` stores each byte
  minus 128 as int8; ``ubinary`` the byte itself);
- ``float16`` is a plain cast (sentence-transformers has none); ``float32`` keeps the values.

Binary indexes may transform the rows before taking bits (``embedkit/index/compact.py``): sentence-transformers' bits
of ``(x - t) @ R``, with ``t`` per-dimension thresholds (``binary_thresholds``: zero, or the corpus mean or median) and
``R`` a random rotation (``random_rotation``). LLM embeddings put much of their variance in a few outlier dimensions,
which a sign bit per dimension weighs like any other; a rotation spreads it over all the bits.
"""

from __future__ import annotations

import numpy as np

PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
FLOAT_PRECISIONS = ("float32", "float16")
SCALAR_PRECISIONS = ("int8", "uint8")
BINARY_PRECISIONS = ("binary", "ubinary")
BINARY_THRESHOLDS = ("zero", "mean", "median")  # where a binary index's bit flips, per dimension
CALIBRATION_ROWS = 10_000  # int8/uint8 ranges, binary thresholds: the sample they are calibrated on (at most)


def check_precision(precision: str) -> str:
    """``precision`` if known, else a one-line error listing the known ones."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    return precision


def check_dimensions(dimensions: int | None, width: int) -> int:
    """The Matryoshka width to keep of ``width``-wide vectors (``None``: all), or a one-line error."""
    if dimensions is None:
        return width
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= width:
        raise ValueError(f"dimensions must be between 1 and {width}, got {dimensions!r}: the vectors have {width} "
                         "components (give none to keep them all).")
    return dimensions


def truncate_dimensions(vectors: np.ndarray, dimensions: int | None, renormalize: bool = True) -> np.ndarray:
    """The first ``dimensions`` components of each row as float32, renormalised to unit length (as Matryoshka
    models are used); the rows unchanged when ``dimensions`` is None or the full width."""
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    check_dimensions(dimensions, vectors.shape[1])
    cut = np.array(vectors[:, :dimensions], dtype=np.float32)
    if renormalize:
        cut /= np.linalg.norm(cut, axis=1, keepdims=True).clip(min=1e-12)
    return cut


def code_width(precision: str, dimension: int) -> int:
    """Columns of the stored array: one per dimension, or one byte per 8 dimensions for the binary precisions."""
    return -(-dimension // 8) if check_precision(precision) in BINARY_PRECISIONS else dimension


def code_dtype(precision: str) -> str:
    """The numpy dtype of the stored array."""
    return {"float32": "float32", "float16": "float16", "int8": "int8", "uint8": "uint8", "binary": "int8",
            "ubinary": "uint8"}[check_precision(precision)]


def bytes_per_vector(precision: str, dimension: int) -> int:
    """Bytes one vector takes at ``precision`` (codes only)."""
    return code_width(precision, dimension) * np.dtype(code_dtype(precision)).itemsize


def calibration_ranges(sample: np.ndarray) -> np.ndarray:
    """Per-dimension (2, d) ``[min; max]`` of a float sample: the int8/uint8 buckets' range."""
    sample = np.asarray(sample, dtype=np.float32)
    if sample.ndim != 2 or len(sample) < 2:
        raise ValueError(f"int8/uint8 ranges need a sample of at least 2 vectors, got shape {sample.shape}.")
    return np.vstack((sample.min(axis=0), sample.max(axis=0)))


def check_binary_threshold(name: str) -> str:
    """``name`` if it is a known binary threshold, else a one-line error listing them."""
    if name not in BINARY_THRESHOLDS:
        raise ValueError(f"binary_threshold must be one of {', '.join(BINARY_THRESHOLDS)}, got {name!r}.")
    return name


def binary_thresholds(sample: np.ndarray, name: str) -> np.ndarray:
    """Per-dimension thresholds of binary codes, from a float sample: zeros (sentence-transformers' ``x > 0``), or
    the sample's mean or median of each dimension."""
    sample = np.asarray(sample, dtype=np.float32)
    if check_binary_threshold(name) == "zero":
        return np.zeros(sample.shape[1], dtype=np.float32)
    if sample.ndim != 2 or len(sample) < 2:
        raise ValueError(f"binary_threshold {name} needs a sample of at least 2 vectors, got shape {sample.shape}.")
    return (sample.mean(axis=0) if name == "mean" else np.median(sample, axis=0)).astype(np.float32)


def random_rotation(dimension: int, seed: int) -> np.ndarray:
    """A random orthogonal ``dimension`` x ``dimension`` float32 matrix, the same from the same seed on any machine:
    NumPy's legacy ``RandomState`` stream is frozen, and the QR factor's columns are sign-fixed (``diag(R) > 0``),
    so no LAPACK convention changes it; only rounding differs."""
    gauss = np.random.RandomState(seed).standard_normal((dimension, dimension))
    q, r = np.linalg.qr(gauss)
    return (q * np.where(np.diag(r) < 0, -1.0, 1.0)).astype(np.float32)


def _steps(ranges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ranges = np.asarray(ranges, dtype=np.float32)
    starts = ranges[0, :]
    steps = (ranges[1, :] - starts) / 255
    return starts, np.where(steps == 0, 1, steps)


def quantize(vectors: np.ndarray, precision: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """Float rows as ``precision`` codes (module docstring); int8/uint8 need ``ranges`` (``calibration_ranges``),
    so every shard and every query shares one calibration."""
    vectors = np.asarray(vectors)
    if vectors.dtype.kind in "iu":
        raise ValueError(f"Vectors to quantize must be float, got {vectors.dtype}.")
    if check_precision(precision) in FLOAT_PRECISIONS:
        return vectors.astype(precision)
    if precision in SCALAR_PRECISIONS:
        if ranges is None:
            raise ValueError(f"precision {precision} needs calibration ranges (min and max per dimension).")
        starts, steps = _steps(ranges)
        codes = np.clip(np.floor((vectors - starts) / steps), 0, 255)
        return codes.astype(np.uint8) if precision == "uint8" else (codes - 128).astype(np.int8)
    packed = np.packbits(vectors > 0, axis=-1)
    return packed if precision == "ubinary" else (packed ^ 0x80).view(np.int8)


def dequantize(codes: np.ndarray, precision: str, dimension: int, ranges: np.ndarray | None = None) -> np.ndarray:
    """Codes back to float32 rows, as sentence-transformers rescores them: int8/uint8 to their bucket's lower edge
    (``min + code * step``), binary/ubinary to 0/1 bits, float16 cast up."""
    codes = np.asarray(codes)
    if check_precision(precision) in FLOAT_PRECISIONS:
        return codes.astype(np.float32)
    if precision in SCALAR_PRECISIONS:
        if ranges is None:
            raise ValueError(f"precision {precision} needs its calibration ranges to be read back.")
        starts, steps = _steps(ranges)
        values = codes.astype(np.float32) + (128 if precision == "int8" else 0)
        return values * steps + starts
    raw = codes.view(np.uint8) ^ 0x80 if precision == "binary" else codes.view(np.uint8)
    return np.unpackbits(raw, axis=-1)[..., :dimension].astype(np.float32)


def to_ubinary(codes: np.ndarray, precision: str) -> np.ndarray:
    """Binary codes as the packed uint8 bits FAISS's binary indexes take."""
    if precision not in BINARY_PRECISIONS:
        raise ValueError(f"Only binary codes pack into bits, not {precision}.")
    codes = np.asarray(codes)
    return np.ascontiguousarray(codes.view(np.uint8) ^ 0x80 if precision == "binary" else codes.view(np.uint8))
