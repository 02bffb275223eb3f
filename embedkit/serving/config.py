"""The server's limits and batching settings: one strict model, so a typo in a setting fails at startup."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

# A merged batch of one-text requests has texts of random lengths. Padded, small forwards (cut longest first) waste
# less on padding than encode's 2048-token ones; packed (embedkit/packing.py), a forward costs its real tokens, so
# fewer, larger forwards pay less fixed cost. Both budgets were measured: docs/serving.md.
SERVE_MAX_BATCH_TOKENS = 256
SERVE_PACKED_BATCH_TOKENS = 1024


class ServeSettings(BaseModel):
    """What one ``embedkit serve`` process accepts and how it batches. Limits answer with a clear 4xx instead
    of letting one request take the server's memory or minutes of its CPU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = Field(min_length=1, description="The name clients pass as `model`.")
    api_key: SecretStr | None = Field(None, description="When set, requests need `Authorization: Bearer <key>`.")
    max_texts_per_request: int = Field(2048, ge=1, description="OpenAI's own limit on inputs per request.")
    max_chars_per_text: int = Field(32_000, ge=1, description="Longer texts are refused before tokenizing.")
    max_tokens_per_request: int = Field(300_000, ge=1, description="Tokens encoded for one request (after "
                                        "truncation to the model's max_length); OpenAI's limit.")
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1, description="Request bodies above this get 413.")
    max_k: int = Field(1000, ge=1, description="Most search hits per query.")
    default_dimensions: int | None = Field(None, ge=1, description="Matryoshka width when a request gives none.")
    max_wait_ms: float = Field(5.0, ge=0, description="How long the first request of an idle batcher waits for "
                               "company before the model runs.")
    max_batch_texts: int = Field(256, ge=1, description="Most texts merged into one model call (a larger request "
                                 "runs alone).")
    rejoin_share: float = Field(0.3, ge=0, le=1, description="When the model is free but fewer texts are queued "
                                "than its last call answered, wait up to this share of that call's time for them "
                                "(answered clients send again).")
    max_queue_texts: int = Field(8192, ge=1, description="Texts waiting for the model; beyond this: 503.")
    packed: bool = Field(True, description="Run merged batches as packed forwards when the model allows it "
                         "(embedkit/packing.py), else padded.")
    max_batch_tokens: int | None = Field(None, ge=1, description="Token budget of one forward batch (as "
                                         "Embedder.encode's max_batch_tokens; default: 1024 real tokens packed, "
                                         "256 padded tokens padded).")
    workers: int | None = Field(None, ge=1, description="Batches run in parallel (default: as Embedder.encode).")
    retry_after_seconds: int = Field(1, ge=1, description="Sent with 503 when the queue is full.")

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> ServeSettings:
        if self.max_queue_texts < self.max_texts_per_request:
            raise ValueError(f"max_queue_texts={self.max_queue_texts} is below max_texts_per_request="
                             f"{self.max_texts_per_request}: a full-size request could never be queued; raise it.")
        return self

    @classmethod
    def from_options(cls, **options) -> ServeSettings:
        """Settings from command-line options: a bad one is a one-line ValueError naming it."""
        try:
            return cls(**options)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(map(str, first["loc"])) or "settings"
            raise ValueError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None


def default_model_name(spec: str) -> str:
    """The name clients use for a model: a folder's own name, else the spec as given (e.g. a hub id)."""
    path = Path(spec)
    return path.resolve().name if path.exists() else spec
