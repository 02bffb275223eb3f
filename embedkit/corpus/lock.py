"""One encode at a time per output folder on one host: an advisory lock held for the whole run.

Two ``embedkit encode`` processes into one folder would clean up each other's temporary files and redo each
other's shards; the second one is refused instead, naming the first one's pid. The lock is ``fcntl.flock`` on
``.encode.lock`` in the folder, so the kernel releases it when its holder exits, even after kill -9 (a stale lock
file is harmless). The file stays empty and is never rewritten (a rerun of a finished job changes no file); the
holder's pid for the error comes from the kernel's lock table (/proc/locks on Linux). torchrun ranks do not take
the lock: they split the shards between them by rank.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: no lock there
    fcntl = None

LOCK_FILE = ".encode.lock"


def lock_holder(path: Path) -> str:
    """The pid holding a flock on ``path`` as the kernel reports it (Linux /proc/locks), else "unknown"."""
    try:
        stat = path.stat()
        where = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()  # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; waiters carry "->"
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == where:
                return fields[4]
    except (OSError, ValueError):
        pass
    return "unknown"


@contextlib.contextmanager
def encode_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold the folder's encode lock for the block (the folder is created if needed); refuse if another holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    with open(path, "a", encoding="utf-8") as handle:  # closing the file releases the lock
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(f"Output folder {folder} is being written by another encode (pid "
                                 f"{lock_holder(path)}); wait for it or choose another --output.") from None
        yield path
