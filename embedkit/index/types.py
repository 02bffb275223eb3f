"""The built-in index types, one registry entry each (flat, hnsw, ivf, ivfpq), and ``auto``'s choice among them.

Each entry is a FAISS factory string plus what FAISS lacks: validated build options, the search setting that
calibration tunes, and whether its file can be memory-mapped. A new type is one more ``register_index_type`` call,
here or in any module (see ``docs/encode-and-index.md``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from embedkit.index.registry import INDEX_TYPES, IndexType, IntParam, Knob, register_index_type

EXACT_MAX_ROWS = 100_000  # auto: exact search up to here (bench/README.md: queries/s measured at this size)
COMPACT_EXACT_MAX_ROWS = 1_000_000  # auto, compact precisions: exact search over the codes up to here
HNSW_MAX_ROWS = 5_000_000  # auto: HNSW up to here if the vectors fit in half the RAM; IVF-PQ beyond
EF_SEARCH_STEPS = (16, 24, 32, 40, 48, 64, 80, 96, 128, 192, 256, 384, 512, 768, 1024)
NPROBE_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
K_FACTOR_STEPS = (1, 2, 4, 8, 16, 32, 64, 128)

# Build options, shared by the types that read them. HNSW with M=0 aborts the process inside FAISS; M=1 has no
# level multiplier (1/log M).
HNSW_M = IntParam("hnsw_m", 2, 1024)
EF_CONSTRUCTION = IntParam("ef_construction", 1)
NLIST = IntParam("nlist", 1, optional=True)
TRAIN_SIZE = IntParam("train_size", 1, optional=True)
PQ_M = IntParam("pq_m", 1, optional=True)


def default_clusters(count: int) -> int:
    """About sqrt(n) clusters (IVF lists, locality order), with at least 39 rows each for k-means."""
    return max(1, min(int(round(math.sqrt(count))), count // 39))


def faiss_nlist(index) -> int:
    """The number of inverted lists of an IVF index (0 for other indexes)."""
    import faiss  # noqa: PLC0415

    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else 0


# -- search settings ---------------------------------------------------------------------------------------------
EF_SEARCH = Knob("efSearch", "ef_search", lambda index: list(EF_SEARCH_STEPS), at_least_k=True,
                 default=16)
NPROBE = Knob("nprobe", "nprobe",
              lambda index: sorted({*(s for s in NPROBE_STEPS if s < faiss_nlist(index)), faiss_nlist(index)}))
K_FACTOR = Knob("k_factor", "k_factor", lambda index: list(K_FACTOR_STEPS))


def hnsw_params(index, settings: dict):
    import faiss  # noqa: PLC0415

    return faiss.SearchParametersHNSW(efSearch=int(settings["efSearch"])) if "efSearch" in settings else None


def _ivf_params(index, settings: dict):
    import faiss  # noqa: PLC0415

    return faiss.SearchParametersIVF(nprobe=int(settings["nprobe"])) if "nprobe" in settings else None


def _refined_ivf_params(index, settings: dict):
    """IVF-PQ with exact re-ranking (IndexRefine): its own parameters wrap the IVF ones."""
    import faiss  # noqa: PLC0415

    params = faiss.IndexRefineSearchParameters(k_factor=float(settings.get("k_factor", index.k_factor)))
    base = _ivf_params(index, settings)
    if base is not None:
        params.base_index_params = base
    return params


# -- build hooks and factories -------------------------------------------------------------------------------------
def set_ef_construction(index, options) -> None:
    index.hnsw.efConstruction = options.ef_construction


def _no_polysemous_training(index, options) -> None:
    import faiss  # noqa: PLC0415

    ivf = faiss.downcast_index(faiss.try_extract_index_ivf(index))
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False  # slow, and only for Hamming filtering


def _ivf_lists_and_training(count: int, options) -> tuple[int, int]:
    nlist = options.nlist or default_clusters(count)
    if nlist > count:
        raise ValueError(f"nlist={nlist} is more than the {count} vectors: lower --nlist.")
    train = options.train_size or min(count, max(64 * nlist, 39 * nlist, 10_000))
    if train > count:
        raise ValueError(f"train_size={train} is more than the {count} vectors: lower --train-size.")
    if train < nlist:
        raise ValueError(f"train_size={train} is less than nlist={nlist}: IVF needs at least one training row "
                         "per list; raise --train-size or lower --nlist.")
    return nlist, train


def pq_m(dimension: int, wanted: int | None) -> int:
    """PQ sub-quantizers: ``wanted`` if it divides the dimension, else the largest divisor up to d/4."""
    target = wanted or max(1, dimension // 4)
    divisors = [m for m in range(1, dimension + 1) if dimension % m == 0 and m <= target]
    if wanted and wanted not in divisors:
        raise ValueError(f"pq_m={wanted} must divide the dimension {dimension}; try {divisors[-1]}.")
    return divisors[-1]


def _ivf_factory(count: int, dimension: int, options) -> tuple[str, int]:
    nlist, train = _ivf_lists_and_training(count, options)
    return f"IVF{nlist},Flat", train


def _ivfpq_factory(count: int, dimension: int, options) -> tuple[str, int]:
    nlist, train = _ivf_lists_and_training(count, options)
    m = pq_m(dimension, options.pq_m)
    bits = max(4, min(8, int(math.log2(max(16, train // 39)))))  # PQ needs ~39 training rows per centroid
    if train < 2**bits:
        raise ValueError(f"train_size={train} is less than the {2**bits} PQ centroids: raise --train-size.")
    return f"IVF{nlist},PQ{m}x{bits},RFlat", train


register_index_type(IndexType(
    name="flat", factory=lambda count, dimension, options: ("Flat", 0),
    description="exact search",
))
register_index_type(IndexType(
    name="hnsw", factory=lambda count, dimension, options: (f"HNSW{options.hnsw_m}", 0),
    params=(HNSW_M, EF_CONSTRUCTION), knobs=(EF_SEARCH,), search_params=hnsw_params,
    prepare=set_ef_construction, locality_order=True,
    description="graph (HNSW), rows added in locality order",
))
register_index_type(IndexType(
    name="ivf", factory=_ivf_factory, params=(NLIST, TRAIN_SIZE), knobs=(NPROBE,), search_params=_ivf_params,
    prepare=_no_polysemous_training, mmap="IO_FLAG_MMAP",
    description="inverted lists over k-means cells",
))
register_index_type(IndexType(
    name="ivfpq", factory=_ivfpq_factory, params=(NLIST, TRAIN_SIZE, PQ_M), knobs=(NPROBE, K_FACTOR),
    search_params=_refined_ivf_params, prepare=_no_polysemous_training, mmap="IO_FLAG_MMAP",
    description="inverted lists of product-quantized codes, re-ranked exactly",
))


# -- auto ----------------------------------------------------------------------------------------------------------
def available_memory() -> int:
    """Bytes of RAM available now (MemAvailable), or total RAM if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_type(count: int, dimension: int, memory: int | None = None, precision: str = "float32") -> str:
    """``auto``: exact up to 100k rows; HNSW up to 5M rows if float32 vectors fit in half the RAM; else IVF-PQ.
    Another precision: the first registered type storing it up to 1M rows (exact over compact codes stays fast
    that far), the last one beyond (the graph)."""
    if precision != "float32":
        fitting = [name for name, kind in INDEX_TYPES.items() if precision in kind.precisions]
        if not fitting:
            raise ValueError(f"No registered index type stores {precision} vectors.")
        return fitting[0] if count <= COMPACT_EXACT_MAX_ROWS else fitting[-1]
    if count <= EXACT_MAX_ROWS:
        return "flat"
    memory = available_memory() if memory is None else memory
    if count <= HNSW_MAX_ROWS and count * dimension * 4 * 1.3 <= memory / 2:
        return "hnsw"
    return "ivfpq"
