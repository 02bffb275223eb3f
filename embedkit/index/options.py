"""``BuildOptions``: the knobs of an index build, validated against the type registry before FAISS sees them.

Saved as a dict in ``index.json`` (``source.options``): a rebuild with equal options and vectors is a no-op, so the
field names and defaults are part of the folder format.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from embedkit.index.registry import AUTO, INDEX_TYPES, IntParam, type_names
from embedkit.quantization import BINARY_PRECISIONS, check_binary_threshold, check_precision

METRICS = ("ip", "l2")
NEWER_DEFAULTS = {"precision": "float32", "dimensions": None}  # fields added after index.json's first version


@dataclass
class BuildOptions:
    """Knobs of ``build_index``; ``None`` means chosen from the corpus size. Every numeric option the type reads
    (for ``auto``: any registered type) is checked here against its registry spec, so a bad value fails before
    any work."""

    index_type: str = "auto"
    metric: str | None = None  # default: the vectors manifest's (ip for normalised vectors, else l2)
    hnsw_m: int = 32
    ef_construction: int = 160  # build depth; bench/README.md has the build-time / recall trade measured
    locality_order: bool = True  # HNSW: add rows grouped by k-means cluster (faster build and search)
    nlist: int | None = None  # IVF lists; default ~sqrt(n)
    pq_m: int | None = None  # PQ sub-quantizers; default d/4 (a divisor of d)
    train_size: int | None = None  # IVF training sample; default 64 per list, at least 39 per list
    target_recall: float = 0.95  # calibration target for recall@10 (approximate types)
    seed: int = 0
    precision: str = "float32"  # what the index stores: float32, or a compact code (embedkit.quantization)
    dimensions: int | None = None  # Matryoshka: index the first N components (renormalised); None: all
    binary_threshold: str | None = None  # binary/ubinary: bits of x - t, t zero, mean or median; None: compact.py's
    binary_rotation: bool | None = None  # binary/ubinary: rotate (seeded) before taking bits; None: compact.py's

    def to_dict(self) -> dict:
        """The options as saved in index.json; the newer fields only when not at their defaults, so folders built
        before them stay up to date. The binary transform is saved for binary precisions unless it is what folders
        from before it hold (zero threshold, no rotation), even unset: those are rebuilt with the new default."""
        out = asdict(self)
        for name, default in NEWER_DEFAULTS.items():
            if out[name] == default:
                del out[name]
        if self.precision not in BINARY_PRECISIONS or (self.binary_threshold, self.binary_rotation) == ("zero", False):
            del out["binary_threshold"], out["binary_rotation"]
        return out

    def __post_init__(self) -> None:
        names = type_names()
        if self.index_type not in names:
            raise ValueError(f"index type must be one of {', '.join(names)}, got {self.index_type!r}.")
        if self.metric is not None and self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}.")
        if isinstance(self.target_recall, bool) or not isinstance(self.target_recall, int | float) \
                or not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}.")
        if not isinstance(self.locality_order, bool):
            raise ValueError(f"locality_order must be true or false, got {self.locality_order!r}.")
        check_precision(self.precision)
        if self.binary_threshold is not None:
            check_binary_threshold(self.binary_threshold)
        if self.binary_rotation is not None and not isinstance(self.binary_rotation, bool):
            raise ValueError(f"binary_rotation must be true or false, got {self.binary_rotation!r}.")
        for name in ("binary_threshold", "binary_rotation"):
            if getattr(self, name) is not None and self.precision not in BINARY_PRECISIONS:
                raise ValueError(f"{name} applies to binary and ubinary indexes, not {self.precision}: drop it, or "
                                 "build with --precision binary.")
        if self.dimensions is not None and (not isinstance(self.dimensions, int) or isinstance(self.dimensions, bool)
                                            or self.dimensions < 1):
            raise ValueError(f"dimensions must be at least 1, got {self.dimensions!r}: give the Matryoshka width to "
                             "index, or none for the vectors' own.")
        kinds = INDEX_TYPES.values() if self.index_type == AUTO else [INDEX_TYPES[self.index_type]]
        if self.index_type != AUTO and self.precision not in INDEX_TYPES[self.index_type].precisions:
            fitting = [name for name, kind in INDEX_TYPES.items() if self.precision in kind.precisions]
            raise ValueError(f"Index type {self.index_type} stores {', '.join(INDEX_TYPES[self.index_type].precisions)}"
                             f" vectors, not {self.precision}: use --type auto or one of: "
                             f"{', '.join(fitting) or '(none registered)'}.")
        for param in (IntParam("seed", 0), *(p for kind in kinds for p in kind.params)):
            if not hasattr(self, param.name):
                raise ValueError(f"An index type reads option {param.name!r}, which BuildOptions does not have.")
            param.check(getattr(self, param.name))
