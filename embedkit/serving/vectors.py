"""How vectors leave the server: cut to a request's Matryoshka width, as JSON floats or OpenAI's base64."""

from __future__ import annotations

import base64

import numpy as np


def truncate_dimensions(vectors: np.ndarray, dimensions: int | None, renormalize: bool = True) -> np.ndarray:
    """The first ``dimensions`` components of each row, renormalised to unit length (as Matryoshka models are
    used). Per request: one dynamic batch mixes requests that ask for different widths."""
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    if not 1 <= dimensions <= vectors.shape[1]:
        raise ValueError(f"dimensions must be between 1 and {vectors.shape[1]}, got {dimensions}.")
    cut = np.ascontiguousarray(vectors[:, :dimensions], dtype=np.float32)
    if renormalize:
        cut /= np.linalg.norm(cut, axis=1, keepdims=True).clip(min=1e-12)
    return cut


def to_base64(vector: np.ndarray) -> str:
    """OpenAI's ``encoding_format="base64"``: the little-endian float32 bytes, base64-encoded."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def from_base64(text: str) -> np.ndarray:
    """The inverse of ``to_base64`` (what OpenAI clients do with the string)."""
    return np.frombuffer(base64.b64decode(text), dtype="<f4")
