"""embedkit: turn any decoder-only LLM into a text encoder."""

import os

# torch's OpenMP runtime (libgomp) spins 300,000 times at every barrier before it sleeps. On a shared CPU with more
# runnable threads than cores, the spinning threads take the cores from the ones with work: a 2-thread training
# step ran 40x slower beside 4 busy processes, while a short spin keeps the idle speed (bench/README.md, "Threads").
# libgomp reads this once, when torch loads it, so it is set before the first torch import; a user's value wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import logging  # noqa: E402

# peft imports bitsandbytes, which on every CPU start says it could not load an optional kernels package for its
# 4-bit CPU matmul (QLoRA on CPU works without it). The line opened every command's output; the filter drops
# that one message and keeps the logger's others.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward"))

import embedkit.methods  # noqa: E402,F401  (the built-in methods register themselves before any embedder loads)
from embedkit.backbone import load_backbone, resolve_spec  # noqa: E402
from embedkit.embedder import Embedder, EmbedderConfig, open_model  # noqa: E402
from embedkit.index import Index  # noqa: E402

__all__ = ["Embedder", "EmbedderConfig", "Index", "load_backbone", "open_model", "resolve_spec"]
__version__ = "0.1.0"
