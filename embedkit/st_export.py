"""The sentence-transformers side of a saved embedder folder, so ``SentenceTransformer(folder)`` loads it.

Writes ``modules.json`` (Transformer -> the pooler's module -> Normalize), ``sentence_bert_config.json``,
``config_sentence_transformers.json`` (the instructions as prompts), ``2_Normalize`` and the pooler's own
module folder ``1_<module_folder>``: a built-in ``Pooling`` config, or what a trainable pooler saves itself
(``Pooler.save_module``; it loads back with ``trust_remote_code=True``). No pooling is named here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from embedkit.pooling import Pooler, pooler_class

logger = logging.getLogger(__name__)

TRANSFORMER_TYPE = "sentence_transformers.base.modules.transformer.Transformer"
NORMALIZE_TYPE = "sentence_transformers.base.modules.normalize.Normalize"


def pooler_folder(folder: Path, pooling: str) -> Path:
    """Where a saved embedder keeps the module of pooling ``pooling``."""
    return folder / f"1_{pooler_class(pooling).module_folder}"


def reproducible_by_sentence_transformers(config, pooler: Pooler, hooked: bool) -> str | None:
    """None if sentence-transformers gives embedkit's vectors for this embedder; else what it cannot do."""
    if pooler.appends_eos:
        return f"pooling={config.pooling!r}"
    if config.template is not None or hooked:
        return "a template or attention/forward hook"
    return None


def warn_if_differs(config, pooler: Pooler, hooked: bool, path: Path) -> None:
    """Log that ``SentenceTransformer(path)`` will load but give other vectors (before the save, so it shows)."""
    reason = reproducible_by_sentence_transformers(config, pooler, hooked)
    if reason is not None:
        logger.warning(
            "sentence-transformers cannot reproduce %s: SentenceTransformer(%s) will load but give "
            "different vectors; use embedkit.Embedder.load for this model.", reason, path,
        )


def write_sentence_transformers(folder: Path, config, pooler: Pooler, dimension: int) -> None:
    """Write every sentence-transformers file of a saved embedder into ``folder``."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": TRANSFORMER_TYPE}]
    (folder / "sentence_bert_config.json").write_text(json.dumps({
        "transformer_task": "feature-extraction",
        "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        "module_output_name": "token_embeddings",
        "max_seq_length": config.max_length,
    }, indent=2))
    module = pooler_folder(folder, config.pooling)
    module_type = pooler.save_module(module, dimension)
    modules.append({"idx": 1, "name": "1", "path": module.name, "type": module_type})
    if config.normalize:
        (folder / "2_Normalize").mkdir()
        (folder / "2_Normalize" / "config.json").write_text(json.dumps({
            "module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"}))
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": NORMALIZE_TYPE})
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    prompts = {"query": config.query_instruction or "", "document": config.document_instruction or ""}
    (folder / "config_sentence_transformers.json").write_text(json.dumps({
        "model_type": "SentenceTransformer", "prompts": prompts, "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }, indent=2))
