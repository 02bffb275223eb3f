"""``EmbedderConfig``: everything that defines an embedder besides its weights, saved as ``embedkit.json``."""

from __future__ import annotations

from pydantic import Field, field_validator

from embedkit import attention as attn
from embedkit.io import StrictConfig
from embedkit.pooling import check_pooling

CONFIG_FILE = "embedkit.json"


class EmbedderConfig(StrictConfig):
    """Everything that defines an embedder besides its weights; saved as ``embedkit.json``."""

    label = "EmbedderConfig"

    backbone: str
    attention: str = "causal"
    pooling: str = "mean"
    max_length: int = 512  # per-text token limit
    normalize: bool = True
    dtype: str = "auto"
    query_instruction: str | None = None
    document_instruction: str | None = None
    template: str | None = None  # e.g. PromptEOL 'This sentence : "{text}" means in one word:"'
    # a trainable pooler's settings (the key is the first such pooler's name; saved folders use it)
    latent_attention: dict | None = None
    methods: dict = Field(default_factory=dict)  # settings of extra methods (token prepending, ...)
    matryoshka_dims: list[int] | None = None  # the dims a Matryoshka loss trained (None: not Matryoshka-trained)

    @field_validator("attention")
    @classmethod
    def _attention(cls, value: str) -> str:
        attn.check_mode(value)
        return value

    @field_validator("pooling")
    @classmethod
    def _pooling(cls, value: str) -> str:
        return check_pooling(value)

    @field_validator("max_length")
    @classmethod
    def _max_length(cls, value: int) -> int:
        if value < 2:
            raise ValueError(f"max_length must be at least 2, got {value}.")
        return value

    @field_validator("template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None and "{text}" not in value:
            raise ValueError(f"template must contain '{{text}}', got {value!r}.")
        return value

    @field_validator("matryoshka_dims")
    @classmethod
    def _matryoshka_dims(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 1):
            raise ValueError(f"matryoshka_dims must be a non-empty list of positive widths, got {value}.")
        return value

    def to_dict(self) -> dict:
        """The saved (and fingerprinted) form: a key added later is left out while it has its default, so
        configs saved before it existed keep their fingerprint."""
        data = self.model_dump()
        if data["matryoshka_dims"] is None:
            del data["matryoshka_dims"]
        return data
