"""FAISS retrieval index over an encoded vectors folder: build (atomic), load (checked, memory-mapped), search.

Index types are registry entries (``registry.py``; the built-in flat, hnsw, ivf and ivfpq in ``types.py``): a FAISS
factory string plus what FAISS lacks: validated build options, ``auto`` (picks by size and memory), and a
calibration (``calibrate.py``) that picks the smallest ``efSearch`` / ``nprobe`` (/ re-ranking depth) reaching a
target recall@10 on probe queries made from the corpus, so an approximate index ships with search settings that
were measured, not guessed. ``build.py`` writes the folder (layout in ``folder.py``), ``search.py`` reads it.
"""

from embedkit.index import compact, types  # noqa: F401  (register the built-in index types)
from embedkit.index.build import BuildResult, build_faiss, build_index, factory_string, locality_order
from embedkit.index.calibrate import calibrate, calibration_probes, recall
from embedkit.index.options import METRICS, BuildOptions
from embedkit.index.registry import IndexType, IntParam, Knob, get_index_type, register_index_type, type_names
from embedkit.index.search import Hit, Index, load_manifest_embedder, verify_index
from embedkit.index.source import VectorSource, exact_knn
from embedkit.index.types import choose_type, default_clusters

__all__ = [
    "METRICS",
    "BuildOptions",
    "BuildResult",
    "Hit",
    "Index",
    "IndexType",
    "IntParam",
    "Knob",
    "VectorSource",
    "build_faiss",
    "build_index",
    "calibrate",
    "calibration_probes",
    "choose_type",
    "default_clusters",
    "exact_knn",
    "factory_string",
    "get_index_type",
    "load_manifest_embedder",
    "locality_order",
    "recall",
    "register_index_type",
    "type_names",
    "verify_index",
]
