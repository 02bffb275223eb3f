"""How vectors leave the server: cut to a request's Matryoshka width, as JSON floats or OpenAI's base64."""

from __future__ import annotations

import base64

import numpy as np
import orjson
from fastapi.responses import JSONResponse

from embedkit.quantization import truncate_dimensions  # noqa: F401  (re-exported: the one Matryoshka cut)


def to_base64(vector: np.ndarray) -> str:
    """OpenAI's ``encoding_format="base64"``: the little-endian float32 bytes, base64-encoded."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def from_base64(text: str) -> np.ndarray:
    """The inverse of ``to_base64`` (what OpenAI clients do with the string)."""
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


class ORJSONResponse(JSONResponse):
    """JSON written by orjson, numpy arrays as lists of their float32 values.

    The standard json module writes each float as a float64 repr, slowly, on the event loop that shares the cores
    with the model (docs/serving.md measures it); orjson writes each float32's shortest digits, which parse back to
    the same float32.
    """

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
