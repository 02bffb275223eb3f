"""embedkit: turn any decoder-only LLM into a text encoder."""

import embedkit.methods  # noqa: F401  (the built-in methods register themselves before any embedder loads)
from embedkit.backbone import load_backbone, resolve_spec
from embedkit.embedder import Embedder, EmbedderConfig
from embedkit.index import Index

__all__ = ["Embedder", "EmbedderConfig", "Index", "load_backbone", "resolve_spec"]
__version__ = "0.1.0"
