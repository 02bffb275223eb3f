"""How vectors leave the server: cut to a request's Matryoshka width, as JSON floats or OpenAI's base64."""

from __future__ import annotations

import base64

import numpy as np

from embedkit.quantization import truncate_dimensions  # noqa: F401  (re-exported: the one Matryoshka cut)


def to_base64(vector: np.ndarray) -> str:
    """OpenAI's ``encoding_format="base64"``: the little-endian float32 bytes, base64-encoded."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def from_base64(text: str) -> np.ndarray:
    """The inverse of ``to_base64`` (what OpenAI clients do with the string)."""
    return np.frombuffer(base64.b64decode(text), dtype="<f4")
