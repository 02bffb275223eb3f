"""Request bodies of the HTTP API: OpenAI's embeddings request (plus per-role instructions) and search.

Unknown fields are refused (a misspelt ``dimensions`` would otherwise silently return full vectors); ``user``
is accepted because OpenAI clients may send it. Items of ``input`` are checked by the app, so that a
non-string item gets a message naming its index rather than pydantic's union report.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``, as OpenAI's API takes it."""

    model_config = ConfigDict(extra="forbid")

    input: str | list[Any]
    model: str
    dimensions: int | None = Field(None, ge=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None
    instruction: str | None = Field(None, description="Prepended to every text, attended to, not pooled.")
    input_type: Literal["query", "document"] | None = Field(
        None, description="Use the model's query or document instruction.")


class SearchRequest(BaseModel):
    """``POST /v1/search``: text queries against the loaded index."""

    model_config = ConfigDict(extra="forbid")

    query: str | list[Any]
    k: int = Field(10, ge=1)
    ef_search: int | None = Field(None, ge=1, description="HNSW search depth (default: the calibrated one).")
    nprobe: int | None = Field(None, ge=1, description="IVF lists visited (default: the calibrated one).")
    model: str | None = None
    instruction: str | None = Field(None, description="Replaces the model's query instruction.")


def usage(tokens: int) -> dict:
    """OpenAI's usage block: every token the model ran counts as a prompt token."""
    return {"prompt_tokens": tokens, "total_tokens": tokens}
