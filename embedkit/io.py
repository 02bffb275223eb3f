"""Safe file I/O. Atomic writes: a reader (or a rerun after kill -9) sees the old file or the whole new one, never half.

Every write goes to a temporary name in the same folder, is flushed and fsynced, then ``os.replace``d over the
target (atomic on POSIX), and the folder is fsynced so the rename survives a power cut.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

TMP_MARK = ".tmp-"  # temporary files are named ".<target name>.tmp-<random>"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, fsync it and rename it over
    ``path``. For writers that want a file name (``faiss.write_index``, ``np.save``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (UTF-8, trailing newline) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any | None:
    """A JSON file's content, or None if it is missing or unreadable (a torn write cannot happen: writes are
    atomic, so None means "not written yet" or "not ours", and callers decide which)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """``np.save`` to ``path`` atomically (never pickled: object arrays are refused)."""
    array = np.asarray(array)
    if array.dtype.hasobject:
        raise TypeError("atomic_save_npy refuses object arrays (they would need pickle); use a fixed dtype.")
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    return Path(path)


def json_digest(data: Any) -> str:
    """A short (16 hex) sha256 of ``data`` as sorted-key JSON: the identity of a job, recipe or run."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (flat memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def npy_bytes(array: np.ndarray) -> bytes:
    """The bytes ``np.save`` writes for ``array`` (to checksum before writing)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def remove_stale_temps(folder: str | os.PathLike, target_prefix: str = "") -> int:
    """Delete temporary files left by a killed writer (``.<prefix>*.tmp-*``); returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for tmp in folder.glob(f".{target_prefix}*{TMP_MARK}*"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def atomic_write_dir(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Write a whole folder atomically: ``fill(tmp_folder)`` builds it under a temporary sibling name, every file
    is fsynced, then it is renamed over ``path``; a crash leaves the old folder (or nothing), never half a one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp.", dir=path.parent))
    try:
        fill(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                with file.open("rb") as handle:
                    os.fsync(handle.fileno())
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    return path


def replace_dir(tmp: Path, path: Path) -> None:
    """Rename a finished folder over ``path``; an existing one is moved aside first and removed after."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


# -- input safety: file names built from data, and text files that must be UTF-8 ---------------------------------
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,127}")


def safe_name(name: object, what: str) -> str:
    """``name`` if it is a plain file name (letters, digits, ``._+=-``, at most 128 characters), else a ValueError.

    Names that come from data (task names, stage names, ids) become file names; a separator, ``..`` or an
    absolute path would let the data write outside its output folder.
    """
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{what} {name!r} is not a safe file name: use letters, digits and . _ + = - only "
                         "(no path separators, no '..', at most 128 characters).")
    return name


def child_path(root: str | os.PathLike, name: str, what: str) -> Path:
    """``root / name`` for a data-given ``name`` that was checked with ``safe_name`` and stays under ``root``."""
    root = Path(root)
    path = root / safe_name(name, what)
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{what} {name!r} would write outside {root}.")
    return path


def iter_text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``(line number from 1, line without its newline)`` of a UTF-8 text file; bad bytes name the file and line."""
    path = Path(path)
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                                 f"{err.start + 1}); re-save the file as UTF-8.") from None
            yield number, line.rstrip("\r\n")


# -- configs: one strict idiom for every settings object that is saved or given by a user ------------------------
class ConfigError(ValueError):
    """A bad setting in a config object: one line naming the setting, what was wrong and what is valid."""


class StrictConfig(BaseModel):
    """Base of embedkit's config objects: unknown keys, wrong types and bad values fail in one line, when built
    and when a field is assigned later (``validate_assignment``), so a config never holds what it would refuse.

    ``label`` names the object in errors (``Unknown <label> keys [...]; valid: [...]``).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)
    label: ClassVar[str] = ""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ConfigError(self._one_line(err)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as err:
            raise ConfigError(self._one_line(err)) from None

    @classmethod
    def from_dict(cls, data: dict) -> StrictConfig:
        """Build from saved JSON or user settings (a dict), with the same one-line errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.label or cls.__name__} settings must be a mapping, got {type(data).__name__}.")
        return cls(**data)

    def to_dict(self) -> dict:
        return self.model_dump()

    @classmethod
    def _one_line(cls, err: ValidationError) -> str:
        label = cls.label or cls.__name__
        errors = err.errors()
        extra = sorted(str(e["loc"][-1]) for e in errors if e["type"] == "extra_forbidden")
        if extra:
            return f"Unknown {label} keys {extra}; valid: {sorted(cls.model_fields)}."
        first = errors[0]
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "value_error":  # our validators' messages name the setting already
            return message
        where = ".".join(str(part) for part in first["loc"])
        return f"{label} setting {where!r}: {message} (got {first.get('input')!r})."
