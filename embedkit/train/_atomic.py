"""Atomic writes for training outputs (checkpoints, adapters, logs): re-exported from ``embedkit.io``, the
project's one atomic writer."""

from __future__ import annotations

from embedkit.io import atomic_write_bytes, atomic_write_dir, atomic_write_text

__all__ = ["atomic_write_bytes", "atomic_write_dir", "atomic_write_text"]
