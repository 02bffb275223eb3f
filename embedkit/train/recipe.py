"""Training recipes: a YAML file validated against this schema before any model loads.

An invalid recipe raises ``RecipeError`` naming the file, the field path (``stages.1.temperature``), the bad
value and what is allowed. ``key.sub=value`` overrides (values parsed as YAML) are applied before
validation, so they are checked the same way. Each stage's keys are validated by its objective's config
(``embedkit/train/objectives/``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, RootModel, SerializeAsAny, ValidationError, model_validator

from embedkit.io import json_digest
from embedkit.train.config import (
    DATA_FORMS,
    CheckpointSpec,
    DataSpec,
    EvaluateSpec,
    Int,
    LoggingSpec,
    LoraSpec,
    ModelSpec,
    PositiveInt,
    SourceSpec,
    StageConfig,
    Strict,
)
from embedkit.train.negatives import NEGATIVE_SELECTORS
from embedkit.train.objectives import OBJECTIVES
from embedkit.train.schedules import ATTENTION_SCHEDULES

# recipe keys that do not change the weights: outside the fingerprint, so a resume may change them
NOT_FINGERPRINTED = ("logging", "checkpoint", "evaluate", "output_dir", "name", "threads", "compile")


class RecipeError(ValueError):
    """A recipe that cannot run; the message says where and how to fix it."""


class Recipe(Strict):
    name: str | None = None
    model: ModelSpec
    lora: LoraSpec = LoraSpec()
    stages: Annotated[list[SerializeAsAny[StageConfig]], Field(min_length=1)]
    seed: Int = 42
    output_dir: str
    data_dir: str | None = None
    checkpoint: CheckpointSpec = CheckpointSpec()
    logging: LoggingSpec = LoggingSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    threads: PositiveInt | None = Field(None, description="torch CPU threads (1 is fastest on a busy machine).")
    compile: bool | Literal["auto"] = Field(
        False, description="torch.compile the decoder layers (forward and backward, dynamic shapes): minutes of "
                           "compiling first, then faster steps where the element-wise kernels weigh. 'auto': only "
                           "where that was measured to pay, a float32 model on CPU (not bf16 there: +3 %).")
    source: str | None = Field(None, exclude=True, description="File the recipe came from (not a key).")

    @model_validator(mode="after")
    def _unique_stage_names(self) -> Recipe:
        names = [self.stage_name(i) for i in range(len(self.stages))]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"stage names must differ (each names its folder stages/<name>/): {twice} repeat")
        return self

    def stage_name(self, index: int) -> str:
        stage = self.stages[index]
        return stage.name or f"{index}-{stage.objective}"

    def fingerprint(self) -> str:
        """Hash of everything that changes the trained weights (not logging, checkpointing or evaluation). Stage
        keys added later (``config.added_later``) count only when set, so older runs keep their fingerprint."""
        data = self.model_dump(mode="json", exclude=set(NOT_FINGERPRINTED))
        _omit_later_defaults(self, data)
        return json_digest(data)


def _omit_later_defaults(model: Any, dumped: Any) -> None:
    """Drop ``added_later`` keys that hold their default from ``dumped`` (the model's JSON dump), at any depth:
    stage keys, ``lora`` keys of the recipe and of a stage, keys of a stage's data sources."""
    if isinstance(model, RootModel):  # a list of sources dumps as a plain list
        model = model.root
    if isinstance(model, list) and isinstance(dumped, list):
        for item, sub in zip(model, dumped, strict=False):
            _omit_later_defaults(item, sub)
        return
    if not isinstance(model, BaseModel) or not isinstance(dumped, dict):
        return
    for key, info in type(model).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        value = getattr(model, key)
        if extra.get("fingerprint_omits_default") and value == info.default:
            dumped.pop(key, None)
        elif key in dumped:
            _omit_later_defaults(value, dumped[key])


# -- loading -------------------------------------------------------------------------------------------------

def _allowed(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


def _describe(err: dict, model: type[BaseModel] | None) -> str:
    if err["type"] == "extra_forbidden":
        allowed = f"; allowed keys: {_allowed(model)}" if model is not None else ""
        return f"unknown key{allowed}"
    return err["msg"]


def _sub_model(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of ``loc`` (for listing allowed keys)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if part in DATA_FORMS:  # the tag of a stage's data form (a mapping of files, or a list of sources)
            current = DataSpec if part == "files" else SourceSpec
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        annotation = current.model_fields[part].annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            inner = getattr(candidate, "__args__", (candidate,))
            found = next((c for c in (candidate, *inner) if isinstance(c, type) and issubclass(c, BaseModel)), None)
            if found is not None:
                current = found
                break
        else:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _format_errors(errors: list[tuple[tuple, Any, str]], source: str) -> str:
    lines = [f"{source}: invalid recipe ({len(errors)} problem{'s' if len(errors) > 1 else ''}):"]
    for loc, value, message in errors:
        path = ".".join(str(p) for p in loc) or "(top level)"
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        lines.append(f"  {path} = {shown}: {message}")
    return "\n".join(lines)


def _collect(err: ValidationError, model: type[BaseModel], prefix: tuple = ()) -> list[tuple[tuple, Any, str]]:
    out = []
    for item in err.errors():
        loc = tuple(item["loc"])
        shown = tuple(p for i, p in enumerate(loc) if not (p in DATA_FORMS and i and loc[i - 1] == "data"))
        out.append((prefix + shown, item.get("input"), _describe(item, _sub_model(model, loc))))
    return out


def validate_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """Validate a recipe dict; collect every problem into one RecipeError."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping (model:, stages:, ...), got {type(data).__name__}.")
    errors: list[tuple[tuple, Any, str]] = []
    stages_raw = data.get("stages")
    stages: list[StageConfig] = []
    if isinstance(stages_raw, list):
        for i, raw in enumerate(stages_raw):
            if not isinstance(raw, dict):
                errors.append((("stages", i), raw, "a stage is a mapping with an 'objective' key"))
                continue
            objective = raw.get("objective")
            if objective not in OBJECTIVES:
                errors.append((("stages", i, "objective"), objective,
                               f"unknown objective; allowed: {', '.join(sorted(OBJECTIVES))}"))
                continue
            config_cls = OBJECTIVES[objective].config_class
            try:
                stage = config_cls.model_validate(raw)
            except ValidationError as err:
                errors += _collect(err, config_cls, ("stages", i))
                continue
            problem = _check_stage_registries(stage)
            if problem:
                errors.append((("stages", i) + problem[0], problem[1], problem[2]))
            stages.append(stage)
    if not isinstance(stages_raw, list) or not stages_raw:
        errors.append((("stages",), stages_raw, "a recipe needs a list of at least one stage (each with an objective)"))
    rest = {k: v for k, v in data.items() if k != "stages"}
    try:
        recipe = Recipe.model_validate({**rest, "stages": stages if (stages and not errors) else [_placeholder()]})
    except ValidationError as err:
        errors += _collect(err, Recipe)
        recipe = None
    if errors:
        raise RecipeError(_format_errors(errors, source))
    recipe.source = source
    return recipe


def _placeholder() -> StageConfig:
    return StageConfig.model_construct(objective="mntp", data=DataSpec(paths=["-"]), steps=1)


def _check_stage_registries(stage: StageConfig) -> tuple[tuple, Any, str] | None:
    if stage.attention_schedule is not None and stage.attention_schedule.name not in ATTENTION_SCHEDULES:
        known = ", ".join(sorted(ATTENTION_SCHEDULES)) or "none registered"
        return (("attention_schedule", "name"), stage.attention_schedule.name, f"unknown schedule; allowed: {known}")
    selection = getattr(stage, "negative_selection", None)
    if selection is not None and selection not in NEGATIVE_SELECTORS:
        return (("negative_selection",), selection,
                f"unknown selector; allowed: {', '.join(sorted(NEGATIVE_SELECTORS))}")
    return None


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``stages.0.steps=10`` -> (['stages', 0, 'steps'], 10); the value is parsed as YAML."""
    if "=" not in text:
        raise RecipeError(f"Override {text!r} is not of the form key.sub=value (e.g. stages.0.steps=10).")
    key, value = text.split("=", 1)
    if not key.strip():
        raise RecipeError(f"Override {text!r} has no key before '='.")
    path: list[str | int] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return path, parsed


def apply_overrides(data: dict, overrides: list[str] | dict[str, Any] | None) -> dict:
    """Return a copy of ``data`` with each ``key.sub=value`` override set (lists indexed by number)."""
    data = copy.deepcopy(data)
    if not overrides:
        return data
    items = (overrides.items() if isinstance(overrides, dict)
             else (parse_override(o) for o in overrides))
    for key, value in items:
        path = key if isinstance(key, list) else parse_override(f"{key}=0")[0]
        node: Any = data
        for depth, part in enumerate(path[:-1]):
            where = ".".join(str(p) for p in path[: depth + 1])
            if isinstance(node, list):
                if not isinstance(part, int) or part >= len(node):
                    raise RecipeError(f"Override {'.'.join(map(str, path))}: {where} is not an index of a list "
                                      f"of {len(node)}.")
                node = node[part]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                raise RecipeError(f"Override {'.'.join(map(str, path))}: {where} is a value, not a section.")
        last = path[-1]
        if isinstance(node, list):
            if not isinstance(last, int) or last >= len(node):
                raise RecipeError(f"Override {'.'.join(map(str, path))}: index out of range.")
        elif not isinstance(node, dict):
            raise RecipeError(f"Override {'.'.join(map(str, path))}: parent is not a section.")
        node[last] = value
    return data


def load_recipe(source: str | os.PathLike | dict | Recipe, overrides: list[str] | dict | None = None) -> Recipe:
    """Read, override and validate a recipe (a YAML path, a dict, or a Recipe)."""
    if isinstance(source, Recipe):
        if not overrides:
            return source
        data, name = source.model_dump(mode="json"), source.source or "<recipe>"
    elif isinstance(source, dict):
        data, name = source, "<recipe>"
    else:
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"Recipe file {path} does not exist.")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise RecipeError(f"{path}: not valid YAML: {err}") from None
        name = str(path)
    recipe = validate_recipe(apply_overrides(data if isinstance(data, dict) else {"_": data}, overrides)
                             if isinstance(data, dict) else data, name)
    return recipe


def recipe_dir(recipe: Recipe) -> Path | None:
    if recipe.source and Path(recipe.source).is_file():
        return Path(recipe.source).resolve().parent
    return None
