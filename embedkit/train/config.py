"""The recipe's building blocks: strict pydantic models (unknown keys and silent coercions are errors).

``StageConfig`` holds the keys every stage has; each objective's own config subclasses it beside the objective
(``embedkit/train/objectives/``). Integers are strict: ``steps: true`` or ``steps: 2.5`` is refused, not read
as 1 or 2.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from embedkit.attention import ATTENTION_MODES
from embedkit.io import safe_name
from embedkit.pooling import check_pooling

AttentionMode = Literal[ATTENTION_MODES]  # type: ignore[valid-type]
PoolingMode = Annotated[str, AfterValidator(check_pooling)]  # any registered pooling, plug-ins included
Int = Annotated[int, Field(strict=True)]
PositiveInt = Annotated[int, Field(gt=0, strict=True)]
NonNegativeInt = Annotated[int, Field(ge=0, strict=True)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
Unit = Annotated[float, Field(ge=0, le=1)]
TokenLimit = Annotated[int, Field(ge=2, strict=True)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSpec(Strict):
    """The embedder being trained: backbone spec and how it embeds."""

    base: str = Field(description="Any spec the core accepts: alias, hub id, HF folder, .gguf file.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attention: AttentionMode = "bidirectional"
    pooling: PoolingMode = "mean"
    max_length: TokenLimit = 512
    template: str | None = None
    query_instruction: str | None = None
    document_instruction: str | None = None
    latent_attention: dict[str, Int] | None = Field(
        None, description="pooling: latent_attention settings (num_latents, num_heads, mlp_ratio); the pooler "
                          "trains in the contrastive stages.")
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _template(self) -> ModelSpec:
        if self.template is not None and "{text}" not in self.template:
            raise ValueError("template must contain '{text}'")
        return self


class LoraSpec(Strict):
    r: PositiveInt = 16
    alpha: PositiveFloat = 32
    dropout: Fraction = 0.05
    target_modules: Literal["auto"] | list[str] = "auto"
    quantization: Literal["none", "4bit", "8bit"] = "none"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    dtype: Literal["float32", "mixed", "model"] = Field(
        "float32", description="Adapter parameters: float32 (stable updates, float32 compute); mixed (float32 "
        "parameters, matmuls in the model's dtype under autocast: bf16 speed with float32 updates); or the model's "
        "dtype (bf16: what sentence-transformers' add_adapter does; small updates can round away).")


class OptimizerSpec(Strict):
    name: Literal["adamw", "adamw_8bit", "sgd"] = "adamw"
    lr: PositiveFloat = 5e-5
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    max_grad_norm: PositiveFloat | None = 1.0


class ScheduleSpec(Strict):
    name: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: NonNegativeInt = 0


class DataSpec(Strict):
    """Files of one stage. Relative paths are looked up in the data folder, then beside the recipe."""

    paths: Annotated[list[str], Field(min_length=1)]
    format: Literal["auto", "text", "jsonl"] = "auto"
    text_field: str = "text"
    anchor_field: str = "anchor"
    positive_field: str = "positive"
    negative_fields: list[str] = ["negative"]
    source_field: str | None = None
    instruction_field: str | None = None
    limit: PositiveInt | None = None


class AttentionScheduleSpec(Strict):
    """A registered per-step attention schedule (sets ``embedder.attention_bias`` each step)."""

    name: str
    settings: dict[str, Any] = {}


class StageConfig(Strict):
    """Keys every stage has; objectives add their own (see the subclasses)."""

    objective: str
    name: str | None = None
    data: DataSpec
    steps: PositiveInt | None = None
    epochs: PositiveFloat | None = None
    batch_size: PositiveInt = 32
    max_length: TokenLimit | None = None
    attention: AttentionMode | None = None
    attention_schedule: AttentionScheduleSpec | None = None
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    lora: LoraSpec | None = None
    save_merged: bool = False

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str | None) -> str | None:
        """The name becomes a folder (``stages/<name>/``): it must not reach outside the run folder."""
        return None if name is None else safe_name(name, "stage name")

    @model_validator(mode="after")
    def _length(self) -> StageConfig:
        if self.steps is None and self.epochs is None:
            raise ValueError("give steps or epochs")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        return self


class CheckpointSpec(Strict):
    every: NonNegativeInt = 100
    keep: PositiveInt = 2


class LoggingSpec(Strict):
    every: PositiveInt = 10
    tensorboard: bool = True
    csv: bool = True
    plot: bool = True
    progress_bar: bool = True


class EvaluateSpec(Strict):
    """STS-B after each stage (and before training with ``before``); dev for choices, test for reports."""

    sts_splits: list[Literal["train", "dev", "test"]] = []
    before: bool = False
    max_length: TokenLimit = Field(128, description="Token limit while scoring (BASELINES: 128).")
