"""The registry of index types: what one type is (its entry), and the lookup by name.

An index type is everything the build, calibration, load and search need to know about one FAISS structure, in
one :class:`IndexType` entry, so no code elsewhere branches on a type's name. Entries register themselves where
they are defined (``embedkit/index/types.py`` for the built-in ones; any module for a plug-in)::

    register_index_type(IndexType(name="sq8", factory=lambda count, dimension, options: ("SQ8", count)))

This module names none of them.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

INT_MAX = 2**31 - 1  # FAISS takes C ints: anything larger wraps around inside SWIG


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class IntParam:
    """A numeric build option (a ``BuildOptions`` field), checked before FAISS sees it: FAISS aborts the process
    on some bad values (``HNSW0``) and silently accepts others."""

    name: str
    minimum: int
    maximum: int = INT_MAX
    optional: bool = False  # None means "chosen from the corpus size"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> None:
        if value is None and self.optional:
            return
        if not _is_int(value) or not self.minimum <= value <= self.maximum:
            raise ValueError(f"{self.name} ({self.flag}) must be an integer from {self.minimum} to {self.maximum}, "
                             f"got {value!r}.")


@dataclass(frozen=True)
class Knob:
    """A search-time setting: its FAISS name (the key in ``index.json``'s ``search``), the keyword of
    ``Index.search`` / the CLI option that overrides it, and the values calibration tries, cheapest first."""

    name: str
    keyword: str
    steps: Callable[[Any], list[int]]  # faiss index -> the values to try
    at_least_k: bool = False  # the search returns at most this many hits (HNSW's efSearch): raised to k
    default: int = 1  # FAISS's own default (the floor raised to k when nothing was calibrated)

    @property
    def flag(self) -> str:
        return "--" + self.keyword.replace("_", "-")

    def check(self, value: Any) -> None:
        """A value given to ``search`` (``None`` = the calibrated one)."""
        if value is None:
            return
        if not _is_int(value) or not 1 <= value <= INT_MAX:
            raise ValueError(f"{self.keyword} ({self.flag}) must be an integer from 1 to {INT_MAX}, got {value!r}.")


@dataclass(frozen=True)
class IndexType:
    """One index type.

    ``factory(count, dimension, options) -> (FAISS factory string, training rows)``; ``params``: the build options
    it reads (validated for every build); ``knobs``: its search settings, the first one calibrated against recall,
    a second one (re-ranking depth) searched at each step of the first; ``search_params(faiss_index, settings)``
    builds FAISS's per-call parameters; ``prepare(faiss_index, options)`` sets build-time fields the factory
    string cannot; ``locality_order``: rows are added grouped by cluster when ``options.locality_order``;
    ``mmap``: the FAISS I/O flag name to memory-map its file (``IO_FLAG_MMAP`` / ``IO_FLAG_MMAP_IFC``), or None
    to always read it into RAM.

    Compact types: ``precisions`` are the ``--precision`` values whose codes it stores (``embedkit.quantization``);
    ``rescore_multiplier``: nonzero for types that ``Index.search`` rescores with float vectors by default: the
    least depth; build calibrates it up to the target recall (calibrate.py); ``create(dimension,
    factory, metric)`` / ``read(path, flags)`` / ``write(index, path)`` replace FAISS's float index I/O (binary
    indexes); ``train(index, source, options) -> facts`` replaces training on a random sample (its facts, e.g. the
    int8 ranges, go into index.json); ``restore(index, info)`` gives a loaded index what those facts set (the
    binary thresholds); ``add(index, source, facts)`` replaces adding float rows a chunk at a time.
    """

    name: str
    factory: Callable[[int, int, Any], tuple[str, int]]
    params: tuple[IntParam, ...] = ()
    knobs: tuple[Knob, ...] = ()
    search_params: Callable[[Any, dict], Any] | None = None
    prepare: Callable[[Any, Any], None] | None = None
    locality_order: bool = False
    mmap: str | None = "IO_FLAG_MMAP_IFC"
    description: str = field(default="", compare=False)
    precisions: tuple[str, ...] = ("float32",)
    rescore_multiplier: int = 0
    create: Callable[[int, str, str], Any] | None = None
    read: Callable[[str, int], Any] | None = None
    write: Callable[[Any, str], None] | None = None
    train: Callable[[Any, Any, Any], dict] | None = None
    restore: Callable[[Any, dict], None] | None = None
    add: Callable[[Any, Any, dict], None] | None = None

    def knob_names(self) -> list[str]:
        return [knob.name for knob in self.knobs]

    def settings_finding(self, settings: dict, k: int) -> dict:
        """``settings`` with every knob that caps the hits a search returns (HNSW's efSearch) raised to ``k``."""
        settings = dict(settings)
        for knob in self.knobs:
            if knob.at_least_k:
                settings[knob.name] = max(settings.get(knob.name) or knob.default, k)
        return settings

    def faiss_params(self, faiss_index, settings: dict):
        """FAISS per-call search parameters from ``{knob name: value}`` (None values ignored); None if none."""
        settings = {k: v for k, v in settings.items() if v is not None}
        if not settings or self.search_params is None:
            return None
        return self.search_params(faiss_index, settings)


INDEX_TYPES: dict[str, IndexType] = {}
AUTO = "auto"


def register_index_type(entry: IndexType) -> IndexType:
    """Add ``entry`` under its name (a name is registered once); its params must be ``BuildOptions`` fields
    (``BuildOptions`` checks that when it validates them)."""
    if entry.name == AUTO or entry.name in INDEX_TYPES:
        raise ValueError(f"Index type {entry.name!r} is already registered.")
    INDEX_TYPES[entry.name] = entry
    return entry


def type_names() -> tuple[str, ...]:
    """``auto`` and every registered type, in registration order."""
    return (AUTO, *INDEX_TYPES)


def get_index_type(name: str) -> IndexType:
    """The entry of a concrete type; a one-line error lists the known ones."""
    try:
        return INDEX_TYPES[name]
    except KeyError:
        raise ValueError(f"Unknown index type {name!r}; known: {', '.join(INDEX_TYPES)}.") from None


def all_knobs() -> list[Knob]:
    """Every search setting some registered type takes (each name once)."""
    seen: dict[str, Knob] = {}
    for entry in INDEX_TYPES.values():
        for knob in entry.knobs:
            seen.setdefault(knob.keyword, knob)
    return list(seen.values())
