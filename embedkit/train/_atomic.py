"""Atomic writes for training outputs: files through ``embedkit.io`` (the project's one atomic writer), and
whole folders (checkpoints, adapters) here, because ``embedkit.io`` writes single files only.

A folder is built under a temporary sibling name, every file fsynced, then renamed over the target, so a crash
or a full disk leaves the old folder (or nothing), never half a folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from embedkit.io import _fsync_dir, atomic_write_bytes, atomic_write_text

__all__ = ["atomic_write_bytes", "atomic_write_dir", "atomic_write_text"]


def atomic_write_dir(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Build a folder with ``fill(tmp_folder)`` then rename it to ``path`` (replacing an old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp.", dir=path.parent))
    try:
        fill(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                with file.open("rb") as handle:
                    os.fsync(handle.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    return path
