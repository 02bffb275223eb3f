"""The recipe's building blocks: strict pydantic models (unknown keys and silent coercions are errors).

``StageConfig`` holds the keys every stage has; each objective's own config subclasses it beside the objective
(``embedkit/train/objectives/``). Integers are strict: ``steps: true`` or ``steps: 2.5`` is refused, not read
as 1 or 2.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    RootModel,
    Tag,
    field_validator,
    model_validator,
)

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


def _top_layers(value: Any) -> Any:
    """``top N`` (or N) as the int N; ``all`` as it is; anything else is refused in one line."""
    if isinstance(value, str) and (match := re.fullmatch(r"\s*top\s+(-?\d+)\s*", value)):
        value = int(match.group(1))
    if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"must be all, 'top N' or an int N >= 1 (LoRA on the top N decoder layers only), got {value!r}")


LoraLayers = Annotated[Literal["all"] | int, BeforeValidator(_top_layers)]


def added_later(default: Any, **kwargs: Any) -> Any:
    """A key added after runs were already saved: left out of the recipe's fingerprint while it holds its default,
    so a run started before the key existed still resumes (``Recipe.fingerprint``)."""
    return Field(default, json_schema_extra={"fingerprint_omits_default": True}, **kwargs)


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
    layers: LoraLayers = added_later(
        "all", description="Which decoder layers get adapters: all, or 'top N' (also just N): only the top N, so "
        "backward stops below the lowest of them (a CPU step's cost falls with N; docs/training.md).")


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
    """Files of one stage (the original form: each path one source). Relative paths are looked up in the data
    folder, then beside the recipe."""

    paths: Annotated[list[str], Field(min_length=1)]
    format: Literal["auto", "text", "jsonl"] = "auto"
    text_field: str = "text"
    anchor_field: str = "anchor"
    positive_field: str = "positive"
    negative_fields: list[str] = ["negative"]
    source_field: str | None = None
    instruction_field: str | None = None
    limit: PositiveInt | None = None


class Columns(Strict):
    """Which column holds which role: anchor / positive / negative (one name or a list), or text."""

    anchor: str | None = None
    positive: str | None = None
    negative: str | list[str] | None = None
    text: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Columns:
        if self.text is not None and any(c is not None for c in (self.anchor, self.positive, self.negative)):
            raise ValueError("map either text, or anchor/positive/negative, not both")
        return self


class SourceSpec(Strict):
    """One source of a data mixture: a local file or ``save_to_disk`` folder (``path``), or a Hugging Face dataset
    (``dataset`` with ``subset`` and ``split``), its column mapping, and its share of the batches."""

    path: str | None = Field(None, description=".jsonl/.csv/.tsv/.parquet/.txt file or a save_to_disk folder.")
    dataset: str | None = Field(None, description="Hugging Face dataset id, loaded with the datasets library.")
    subset: str | None = None
    split: str = "train"
    name: str | None = Field(None, description="The source's name in batches and logs (default: path or id).")
    columns: Columns = Columns()
    instruction: str | None = Field(None, description="Instruction of this source's anchors (supervised).")
    weight: float | None = Field(None, description="Relative share of the batches; give every source one, or none.")
    sampling_exponent: Annotated[float, Field(ge=0)] = Field(
        1.0, description="Without weights a source's share is rows ** sampling_exponent (1: by size, 0: equal).")
    limit: PositiveInt | None = Field(None, description="Read at most this many rows (the first ones).")
    inverse_cloze: PositiveInt | None = added_later(
        None, description="Read a text source as inverse-cloze pairs: each run of N + 1 consecutive texts gives one "
                          "(text, the other N joined) pair, a sentence against its passage (Lee et al. 2019).")

    @field_validator("weight")
    @classmethod
    def _positive_weight(cls, weight: float | None) -> float | None:
        if weight is not None and not weight > 0:
            raise ValueError(f"weight must be > 0 (a share of the batches), got {weight}; leave the source out to "
                             "give it none")
        return weight

    @model_validator(mode="after")
    def _where(self) -> SourceSpec:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give a source either path (a local file or folder) or dataset (a hub id)")
        if self.path is not None and (self.subset is not None or self.split != "train"):
            raise ValueError("subset and split apply to a hub dataset; a local path is read whole")
        if self.inverse_cloze and any(c is not None for c in (self.columns.anchor, self.columns.positive,
                                                                self.columns.negative)):
            raise ValueError("inverse_cloze makes pairs from a text column: map text: COLUMN (a .txt file needs "
                             "no mapping), not anchor/positive/negative")
        return self

    @property
    def label(self) -> str:
        """The source's name: ``name``, else its path, else ``id[/subset]:split``."""
        if self.name is not None:
            return self.name
        if self.path is not None:
            return self.path
        return f"{self.dataset}{'/' + self.subset if self.subset else ''}:{self.split}"


class SourceList(RootModel[Annotated[list[SourceSpec], Field(min_length=1)]]):
    """A stage's data as a mixture: a list of sources (YAML: ``data: [{path: ...}, {dataset: ...}]``)."""

    @model_validator(mode="after")
    def _consistent(self) -> SourceList:
        labels = [s.label for s in self.root]
        twice = sorted({n for n in labels if labels.count(n) > 1})
        if twice:
            raise ValueError(f"sources must have distinct names (set name:), {twice} repeat")
        if any(s.weight is not None for s in self.root) and any(s.weight is None for s in self.root):
            raise ValueError("give every source a weight, or none (then shares follow rows ** sampling_exponent)")
        return self

    @property
    def sources(self) -> list[SourceSpec]:
        return self.root

    @property
    def paths(self) -> list[str]:
        """The sources' names, where messages name a stage's data (as ``DataSpec.paths`` does)."""
        return [s.label for s in self.root]


DATA_FORMS = ("files", "sources")  # the tags of the two forms (left out of error paths by the recipe loader)
StageData = Annotated[
    Union[Annotated[DataSpec, Tag("files")], Annotated[SourceList, Tag("sources")]],  # noqa: UP007
    Discriminator(lambda value: "sources" if isinstance(value, list | SourceList) else "files")]


class AttentionScheduleSpec(Strict):
    """A registered per-step attention schedule (sets ``embedder.attention_bias`` each step)."""

    name: str
    settings: dict[str, Any] = {}


class StageConfig(Strict):
    """Keys every stage has; objectives add their own (see the subclasses)."""

    objective: str
    name: str | None = None
    data: StageData
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
