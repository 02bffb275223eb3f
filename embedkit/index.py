"""FAISS retrieval index over an encoded vectors folder: build (atomic), load (memory-mapped), search.

```
INDEX_DIR/
  index.faiss          the FAISS index; its labels are row positions 0..n-1 in the vectors folder's order
  ids.npy              position -> corpus id (UTF-8 bytes, fixed width: memory-mapped, never pickled)
  texts.bin            the corpus texts, concatenated UTF-8 (only when the corpus files were found unchanged)
  texts.offsets.npy    position -> byte offset into texts.bin (n + 1 int64)
  vectors.json         the vectors folder's manifest: which model (spec + fingerprint) encoded the corpus
  index.json           type, FAISS factory string, metric, search parameters and their measured recall, checksums
```

Index types are FAISS factory strings (``Flat``, ``HNSW32``, ``IVF{nlist},Flat``, ``IVF{nlist},PQ{m}``). We add
two things FAISS lacks: ``auto`` (picks by size and memory) and a calibration that picks the smallest
``efSearch`` / ``nprobe`` (/ re-ranking depth) reaching a target recall@10 on probe queries made from the corpus
(rows moved off themselves by their own neighbour spacing), so an approximate index ships with search settings
that were measured, not guessed.
"""

from __future__ import annotations

import json
import logging
import math
import mmap as _mmap
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from embedkit.io import atomic_path, atomic_save_npy, atomic_write_json, replace_dir, sha256_file

logger = logging.getLogger(__name__)

INDEX_FORMAT = "embedkit-index"
INDEX_VERSION = 1
INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq")
METRICS = ("ip", "l2")
EXACT_MAX_ROWS = 100_000  # auto: exact search up to here (~2,000 queries/s at 100k x 256 on 2 threads)
HNSW_MAX_ROWS = 5_000_000  # auto: HNSW up to here if the vectors fit in half the RAM; IVF-PQ beyond
PROBES = 200
CALIBRATION_K = 10
EF_SEARCH_STEPS = (16, 24, 32, 40, 48, 64, 80, 96, 128, 192, 256, 384, 512, 768, 1024)
NPROBE_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
K_FACTOR_STEPS = (1, 2, 4, 8, 16, 32, 64, 128)
MMAP_MIN_BYTES = 256 << 20  # Index.load memory-maps index files at least this large (mmap=None)


# -- vector sources -------------------------------------------------------------------------------------------
class _Source:
    """Rows to index, read in chunks as float32 (an in-memory array, or a memory-mapped vectors folder)."""

    def __init__(self, vectors):
        from embedkit.corpus.manifest import VectorSet  # noqa: PLC0415

        self.vset = vectors if isinstance(vectors, VectorSet) else None
        if self.vset is None:
            array = np.asarray(vectors)
            if array.ndim != 2 or len(array) == 0:
                raise ValueError(f"Vectors must be a non-empty 2-D array, got shape {array.shape}.")
            self.array = array
            self.count, self.dimension = array.shape
        else:
            self.count, self.dimension = self.vset.count, self.vset.dimension

    @classmethod
    def of(cls, vectors) -> _Source:
        """``vectors`` as a source; a source passes through (callers share one without re-reading it)."""
        return vectors if isinstance(vectors, cls) else cls(vectors)

    def chunks(self, rows: int = 65536) -> Iterator[np.ndarray]:
        if self.vset is None:
            for start in range(0, self.count, rows):
                yield np.ascontiguousarray(self.array[start:start + rows], dtype=np.float32)
            return
        for _, vectors in self.vset.iter_shards():
            for start in range(0, len(vectors), rows):
                yield np.ascontiguousarray(vectors[start:start + rows], dtype=np.float32)

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Rows at sorted ``positions`` as float32."""
        if self.vset is None:
            return np.ascontiguousarray(self.array[positions], dtype=np.float32)
        out, start = [], 0
        for _, vectors in self.vset.iter_shards():
            end = start + len(vectors)
            inside = positions[(positions >= start) & (positions < end)]
            if len(inside):
                out.append(np.asarray(vectors[inside - start], dtype=np.float32))
            start = end
        return np.ascontiguousarray(np.concatenate(out))


def _faiss_metric(metric: str) -> int:
    import faiss  # noqa: PLC0415

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}.")
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def exact_knn(source, queries: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over all rows, a chunk at a time (flat memory); returns (scores, positions)."""
    import faiss  # noqa: PLC0415

    source = _Source.of(source)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    heap = faiss.ResultHeap(len(queries), k, keep_max=metric == "ip")
    start = 0
    for chunk in source.chunks():
        distances, labels = faiss.knn(queries, chunk, min(k, len(chunk)), metric=_faiss_metric(metric))
        heap.add_result(distances, np.where(labels >= 0, labels + start, -1))
        start += len(chunk)
    heap.finalize()
    return heap.D, heap.I


def available_memory() -> int:
    """Bytes of RAM available now (MemAvailable), or total RAM if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_type(count: int, dimension: int, memory: int | None = None) -> str:
    """``auto``: exact up to 100k rows; HNSW up to 5M rows if float32 vectors fit in half the RAM; else IVF-PQ."""
    if count <= EXACT_MAX_ROWS:
        return "flat"
    memory = available_memory() if memory is None else memory
    if count <= HNSW_MAX_ROWS and count * dimension * 4 * 1.3 <= memory / 2:
        return "hnsw"
    return "ivfpq"


@dataclass
class BuildOptions:
    """Knobs of ``build_index``; ``None`` means chosen from the corpus size."""

    index_type: str = "auto"
    metric: str | None = None  # default: the vectors manifest's (ip for normalised vectors, else l2)
    hnsw_m: int = 32
    ef_construction: int = 160  # 1M clustered: 3.3x the build time of 80, recall at efSearch 48 0.88 -> 0.99
    locality_order: bool = True  # HNSW: add rows grouped by k-means cluster (faster build and search)
    nlist: int | None = None  # IVF lists; default ~sqrt(n)
    pq_m: int | None = None  # PQ sub-quantizers; default d/4 (a divisor of d)
    train_size: int | None = None  # IVF training sample; default 64 per list, at least 39 per list
    target_recall: float = 0.95  # calibration target for recall@10 (approximate types)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"index type must be one of {', '.join(INDEX_TYPES)}, got {self.index_type!r}.")
        if self.metric is not None and self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}.")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}.")


def default_clusters(count: int) -> int:
    """About sqrt(n) clusters (IVF lists, locality order), with at least 39 rows each for k-means."""
    return max(1, min(int(round(math.sqrt(count))), count // 39))


def _pq_m(dimension: int, wanted: int | None) -> int:
    target = wanted or max(1, dimension // 4)
    divisors = [m for m in range(1, dimension + 1) if dimension % m == 0 and m <= target]
    if wanted and wanted not in divisors:
        raise ValueError(f"pq_m={wanted} must divide the dimension {dimension}; try {divisors[-1]}.")
    return divisors[-1]


def factory_string(index_type: str, count: int, dimension: int, options: BuildOptions) -> tuple[str, int]:
    """(FAISS factory string, training rows) for a concrete type."""
    if index_type == "flat":
        return "Flat", 0
    if index_type == "hnsw":
        return f"HNSW{options.hnsw_m}", 0
    nlist = options.nlist or default_clusters(count)
    if nlist > count:
        raise ValueError(f"nlist={nlist} is more than the {count} vectors: lower --nlist.")
    train = options.train_size or min(count, max(64 * nlist, 39 * nlist, 10_000))
    if index_type == "ivf":
        return f"IVF{nlist},Flat", train
    m = _pq_m(dimension, options.pq_m)
    bits = max(4, min(8, int(math.log2(max(16, train // 39)))))  # PQ needs ~39 training rows per centroid
    return f"IVF{nlist},PQ{m}x{bits},RFlat", train


def _param_names(index) -> list[str]:
    """The search settings an index takes: efSearch (HNSW), nprobe (IVF), k_factor (exact re-ranking)."""
    import faiss  # noqa: PLC0415

    names = []
    if isinstance(index, faiss.IndexIDMap):  # HNSW in locality order
        index = faiss.downcast_index(index.index)
    if isinstance(index, faiss.IndexRefine):
        names.append("k_factor")
        index = faiss.downcast_index(index.base_index)
    if isinstance(index, faiss.IndexHNSW):
        names.insert(0, "efSearch")
    elif faiss.try_extract_index_ivf(index) is not None:
        names.insert(0, "nprobe")
    return names


def _search_params(index, settings: dict):
    """FAISS per-call search parameters from ``{"efSearch"|"nprobe"|"k_factor": value}`` (None values ignored)."""
    import faiss  # noqa: PLC0415

    settings = {k: v for k, v in settings.items() if v is not None}
    if not settings:
        return None
    base = None
    if "efSearch" in settings:
        base = faiss.SearchParametersHNSW(efSearch=int(settings["efSearch"]))
    elif "nprobe" in settings:
        base = faiss.SearchParametersIVF(nprobe=int(settings["nprobe"]))
    if isinstance(index, faiss.IndexRefine):
        params = faiss.IndexRefineSearchParameters(k_factor=float(settings.get("k_factor", index.k_factor)))
        if base is not None:
            params.base_index_params = base
        return params
    return base


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) for f, t in zip(found, truth, strict=True))
    return hits / max(1, sum(int((t >= 0).sum()) for t in truth))


def calibration_probes(source, metric: str, seed: int = 0, probes: int = PROBES) -> tuple[np.ndarray, np.ndarray]:
    """Probe queries that are not corpus rows, and their exact top-10 (positions).

    A corpus row used as its own query is found at once by HNSW (it is a graph node whose links are its
    neighbours), so recall measured that way is far too optimistic. Each probe is a corpus row moved by random
    noise as long as the distance to its nearest other row, i.e. a new point at the corpus's own spacing.
    """
    source = _Source.of(source)
    rng = np.random.default_rng(seed + 1)
    own = np.sort(rng.choice(source.count, size=min(probes, source.count), replace=False))
    rows = source.take(own)
    k = min(CALIBRATION_K, source.count)
    if source.count < 2:
        return rows, np.zeros((len(rows), 0), dtype=np.int64)
    scores, labels = exact_knn(source, rows, 2, metric)
    nearest = np.where(labels[:, 0] == own, scores[:, 1], scores[:, 0])  # the nearest row other than itself
    gap = np.sqrt(np.maximum(2 - 2 * nearest, 0)) if metric == "ip" else np.sqrt(np.maximum(nearest, 0))
    noise = rng.standard_normal(rows.shape).astype(np.float32)
    noise *= (gap / np.linalg.norm(noise, axis=1).clip(min=1e-12))[:, None]
    queries = rows + noise
    if metric == "ip":  # inner-product corpora are normalised: keep probes on the sphere too
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True).clip(min=1e-12) * norms
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    _, truth = exact_knn(source, queries, k, metric)
    return queries, truth


def calibrate(index, source, metric: str, target: float, seed: int = 0, probes: int = PROBES) -> dict:
    """Cheapest search settings whose recall@10 against exact search reaches ``target`` on corpus probes:
    efSearch (HNSW), nprobe (IVF), and for IVF-PQ the re-ranking depth k_factor at each nprobe."""
    names = _param_names(index)
    source = _Source.of(source)
    queries, truth = calibration_probes(source, metric, seed, probes)
    k = truth.shape[1]
    if k < 1:
        return {"settings": {}, "recall_at_10": 1.0, "probes": len(queries)}
    curve: list[list] = []

    def measure(settings: dict) -> float:
        _, labels = index.search(queries, k, params=_search_params(index, settings))
        recall = _recall(labels, truth)
        curve.append([dict(settings), round(recall, 4)])
        return recall

    if not names:
        return {"settings": {}, "recall_at_10": round(measure({}), 4), "probes": len(queries)}
    if names[0] == "efSearch":
        steps = [{"efSearch": v} for v in EF_SEARCH_STEPS]
    else:
        nlist = faiss_nlist(index)
        steps = [{"nprobe": v} for v in sorted({*(s for s in NPROBE_STEPS if s < nlist), nlist})]
    best = None
    for settings in steps:
        if "k_factor" not in names:
            if measure(settings) >= target:
                best = settings
                break
            continue
        # IVF-PQ: is the target reachable at this nprobe with the deepest re-ranking? then the smallest depth
        if measure({**settings, "k_factor": K_FACTOR_STEPS[-1]}) >= target:
            for factor in K_FACTOR_STEPS:
                if measure({**settings, "k_factor": factor}) >= target:
                    best = {**settings, "k_factor": factor}
                    break
            break
    if best is None:  # target not reached: the most accurate setting seen (PQ recall can fall with nprobe)
        best = max(curve, key=lambda point: point[1])[0]
    recall = next(r for s, r in reversed(curve) if s == best)
    if recall < target:
        logger.warning("Calibration: %s reaches recall@10 %.3f only (target %.2f); searches use it.", best, recall,
                       target)
    return {"settings": best, "recall_at_10": recall, "probes": len(queries), "target": target, "curve": curve}


def locality_order(source, metric: str, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Row positions grouped by k-means cluster (about sqrt(n) clusters, trained on a sample).

    HNSW adds rows in this order, so a graph's neighbours sit near each other in memory, and a search walks a
    few contiguous regions instead of the whole array. On 1M x 256 clustered vectors, side by side at the same
    efSearch, this gave about 1.3x the queries/s at equal or better recall (docs/encode-and-index.md).
    """
    import faiss  # noqa: PLC0415

    source = _Source.of(source)
    began = time.perf_counter()
    clusters = default_clusters(source.count)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(source.count, size=min(source.count, 64 * clusters), replace=False))
    kmeans = faiss.Kmeans(source.dimension, clusters, niter=10, seed=seed, spherical=metric == "ip")
    kmeans.train(source.take(sample))
    assignment = np.concatenate([kmeans.index.search(chunk, 1)[1][:, 0] for chunk in source.chunks()])
    order = np.argsort(assignment, kind="stable")
    return order, {"clusters": clusters, "seconds": round(time.perf_counter() - began, 2)}


def _rows_in_order(source: _Source, order: np.ndarray) -> np.ndarray:
    """All rows as one float32 array with row ``order[i]`` at ``i``, filled a chunk at a time (one copy)."""
    rows = np.empty((source.count, source.dimension), dtype=np.float32)
    slot = np.empty_like(order)
    slot[order] = np.arange(len(order))
    start = 0
    for chunk in source.chunks():
        rows[slot[start:start + len(chunk)]] = chunk
        start += len(chunk)
    return rows


def faiss_nlist(index) -> int:
    import faiss  # noqa: PLC0415

    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else 0


def build_faiss(vectors, options: BuildOptions | None = None, metric: str = "ip") -> tuple[object, dict]:
    """A FAISS index over ``vectors`` (array or VectorSet) whose labels are row positions, plus build facts
    (type, factory string, calibrated search parameter, seconds). Adds a chunk at a time."""
    import faiss  # noqa: PLC0415

    options = options or BuildOptions()
    source = _Source(vectors)
    began = time.perf_counter()
    index_type = options.index_type
    if index_type == "auto":
        index_type = choose_type(source.count, source.dimension)
    factory, train_rows = factory_string(index_type, source.count, source.dimension, options)
    index = faiss.index_factory(source.dimension, factory, _faiss_metric(metric))
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efConstruction = options.ef_construction
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and hasattr(faiss.downcast_index(ivf), "do_polysemous_training"):
        faiss.downcast_index(ivf).do_polysemous_training = False  # slow, and only for Hamming filtering
    train_seconds = 0.0
    if not index.is_trained:
        rng = np.random.default_rng(options.seed)
        sample = np.sort(rng.choice(source.count, size=train_rows, replace=False))
        t0 = time.perf_counter()
        index.train(source.take(sample))
        train_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    order_info = None
    if isinstance(index, faiss.IndexHNSW) and options.locality_order:
        order, order_info = locality_order(source, metric, options.seed)
        index = faiss.IndexIDMap(index)  # labels stay row positions
        # One add call: storage follows the order, but faiss shuffles the insertion order within a call. Added
        # a chunk at a time, clusters were inserted one after another and the graph was worse (1M clustered,
        # efSearch 48: recall 0.961 vs 0.987). The price is one float32 copy of the vectors while adding.
        index.add_with_ids(_rows_in_order(source, order), order.astype(np.int64))
    else:
        for chunk in source.chunks():
            index.add(chunk)
    add_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    calibration = calibrate(index, source, metric, options.target_recall, options.seed)
    info = {
        "type": index_type, "factory": factory, "metric": metric, "count": int(index.ntotal),
        "dimension": source.dimension, "train_rows": train_rows,
        "search": calibration["settings"],
        "calibration": calibration,
        "locality_order": order_info,
        "seconds": {"train": round(train_seconds, 2), "add": round(add_seconds, 2),
                    "calibrate": round(time.perf_counter() - t0, 2),
                    "total": round(time.perf_counter() - began, 2)},
        "options": asdict(options),
    }
    return index, info


# -- the index folder -------------------------------------------------------------------------------------
def _write_ids(path: Path, ids: Sequence[str]) -> None:
    encoded = [i.encode("utf-8") for i in ids]
    width = max(1, max(map(len, encoded), default=1))
    atomic_save_npy(path, np.array(encoded, dtype=f"S{width}"))


def _corpus_unchanged(manifest: dict) -> str | None:
    """Why the corpus files cannot give the texts (moved, changed), or None if they can."""
    for item in manifest["inputs"]:
        path = Path(item["path"])
        if not path.is_file():
            return f"{path} is not there any more"
        stat = path.stat()
        changed = stat.st_mtime_ns != item["mtime_ns"] and sha256_file(path) != item["sha256"]
        if stat.st_size != item["size"] or changed:
            return f"{path} changed since it was encoded"
    return None


class _TextsMismatch(Exception):
    pass


def _write_texts(folder: Path, manifest: dict, ids: Sequence[str]) -> str | None:
    """Store the corpus texts by position (streamed); returns why not, if they could not be stored."""
    from embedkit.corpus.readers import ReaderOptions, read_records  # noqa: PLC0415

    problem = _corpus_unchanged(manifest)
    if problem:
        return problem
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    position = 0
    try:
        with atomic_path(folder / "texts.bin") as tmp, open(tmp, "wb") as handle:
            reader = ReaderOptions(**manifest["reader"])
            for record in read_records([i["path"] for i in manifest["inputs"]], reader):
                if record.empty:
                    continue
                if position >= len(ids) or record.id != ids[position]:
                    raise _TextsMismatch(f"{record.where} (id {record.id!r}) does not line up with the vectors' ids")
                data = record.text.encode("utf-8")
                handle.write(data)
                offsets[position + 1] = offsets[position] + len(data)
                position += 1
            if position != len(ids):
                raise _TextsMismatch(f"the corpus gave {position} texts for {len(ids)} vectors")
    except _TextsMismatch as err:
        return str(err)
    atomic_save_npy(folder / "texts.offsets.npy", offsets)
    return None


@dataclass
class BuildResult:
    output: Path
    info: dict
    texts: bool
    up_to_date: bool = False
    note: str | None = None

    def summary(self) -> str:
        info = self.info
        if self.up_to_date:
            return f"Nothing to do: {self.output} is up to date ({info['type']}, {info['count']} vectors)."
        cal = info["calibration"]
        settings = ", ".join(f"{k}={v}" for k, v in cal["settings"].items())
        tuned = (f"; {settings} gives recall@10 {cal['recall_at_10']:.3f} on {cal['probes']} corpus probes"
                 if settings else "")
        texts = "with texts" if self.texts else f"without texts ({self.note})"
        return (f"Built {self.output}: {info['type']} ({info['factory']}, {info['metric']}) over {info['count']} "
                f"vectors x {info['dimension']} in {info['seconds']['total']:.1f} s{tuned}; {texts}.")


def build_index(
    vectors_dir: str | os.PathLike,
    output: str | os.PathLike,
    options: BuildOptions | None = None,
    *,
    texts: bool = True,
    verify: bool = True,
) -> BuildResult:
    """Build an index folder from a finished vectors folder; written to a temporary folder and renamed.

    Rebuilding with the same vectors and options does nothing; another embedkit index at ``output`` is replaced.
    """
    from embedkit.corpus.manifest import open_vectors  # noqa: PLC0415

    options = options or BuildOptions()
    vset = open_vectors(vectors_dir, verify=verify)
    manifest = vset.manifest
    metric = options.metric or manifest["metric"]
    output = Path(output)
    wanted = {"job": manifest["job"], "finished": manifest["finished"], "options": asdict(options), "metric": metric,
              "texts": texts}
    if output.exists():
        current = _read_json(output / "index.json")
        if current is None:
            if output.is_dir() and not any(output.iterdir()):
                output.rmdir()
            else:
                raise ValueError(f"{output} exists and is not an embedkit index folder: choose another --output.")
        elif current.get("source") == wanted and _index_files_ok(output, current):
            return BuildResult(output, current, bool(current.get("texts")), up_to_date=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        index, info = build_faiss(vset, options, metric)
        import faiss  # noqa: PLC0415

        with atomic_path(tmp / "index.faiss") as path:
            faiss.write_index(index, str(path))
        del index
        ids = vset.ids()
        _write_ids(tmp / "ids.npy", ids)
        note = _write_texts(tmp, manifest, ids) if texts else "--no-texts"
        if note and texts:
            logger.warning("Index without texts: %s.", note)
        atomic_write_json(tmp / "vectors.json", manifest)
        info.update({
            "format": INDEX_FORMAT, "version": INDEX_VERSION, "source": wanted,
            "vectors_dir": str(Path(vectors_dir).resolve()), "texts": note is None, "texts_note": note,
            "model": {"spec": manifest["model"]["spec"], "fingerprint": manifest["model"]["fingerprint"]},
            "normalized": manifest["normalized"],
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                      for p in sorted(tmp.iterdir()) if p.is_file()},
        })
        atomic_write_json(tmp / "index.json", info)
        replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildResult(output, info, note is None, note=note)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _index_files_ok(folder: Path, info: dict, check_sums: bool = False) -> bool:
    return _index_problem(folder, info, check_sums) is None


def _index_problem(folder: Path, info: dict, check_sums: bool) -> str | None:
    for name, facts in info.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != facts["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, index.json says {facts['bytes']}"
        if check_sums and sha256_file(path) != facts["sha256"]:
            return f"{path} is corrupt (sha256 mismatch)"
    return None


# -- loading and searching -----------------------------------------------------------------------------
@dataclass
class Hit:
    """One search result: corpus id, score (cosine for ip, squared L2 distance for l2), text if known."""

    id: str
    score: float
    text: str | None = None
    position: int = field(default=-1, repr=False)

    def to_dict(self) -> dict:
        out = {"id": self.id, "score": round(float(self.score), 6)}
        if self.text is not None:
            out["text"] = self.text
        return out


def load_manifest_embedder(manifest: dict, dtype: str | None = None):
    """The embedder that encoded a vectors folder, rebuilt from its manifest (spec + config)."""
    from embedkit.embedder import open_model  # noqa: PLC0415

    spec, cfg = manifest["model"]["spec"], dict(manifest["model"]["config"])
    la = {k: v for k, v in (cfg.get("latent_attention") or {}).items() if k != "hidden_size"} or None
    saved = (Path(spec) / "embedkit.json").is_file()
    embedder = open_model(
        spec, attention=cfg["attention"], pooling=cfg["pooling"], dtype=dtype or cfg["dtype"],
        max_length=cfg["max_length"], normalize=cfg["normalize"], query_instruction=cfg["query_instruction"],
        document_instruction=cfg["document_instruction"], template=cfg["template"],
        latent_attention=None if saved else la,
    )
    if cfg.get("methods") and not saved:
        from embedkit.methods import apply_methods  # noqa: PLC0415

        embedder.config.methods = dict(cfg["methods"])
        apply_methods(embedder)
    embedder.config.backbone = cfg["backbone"]  # the label it was encoded under (part of the fingerprint)
    return embedder


class Index:
    """A built index folder, ready to search by text (encoded by the corpus's own model) or by vector."""

    def __init__(self, folder: Path, faiss_index, info: dict, manifest: dict, ids: np.ndarray,
                 texts: tuple[np.ndarray, _mmap.mmap] | None, embedder=None, check_model: bool = True):
        self.folder = folder
        self.faiss = faiss_index
        self.info = info
        self.manifest = manifest
        self._ids = ids
        self._texts = texts
        self._embedder = None
        self.check_model = check_model
        if embedder is not None:
            self._check_embedder(embedder)
            self._embedder = embedder

    # -- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, *, embedder=None, mmap: bool | None = None, verify: bool = False,
             check_model: bool = True) -> Index:
        """Open an index folder. ``mmap`` (default: for files >= 256 MB) maps the FAISS file instead of reading
        it into RAM; ``embedder`` overrides the manifest's model for queries (it must match it unless
        ``check_model=False``); ``verify`` checks every file's checksum."""
        import faiss  # noqa: PLC0415

        folder = Path(path)
        info = _read_json(folder / "index.json")
        if info is None or info.get("format") != INDEX_FORMAT:
            raise FileNotFoundError(f"{folder} is not an embedkit index folder (no valid index.json): build one "
                                    "with `embedkit index build VECTORS_DIR --output INDEX_DIR`.")
        if info.get("version", 0) > INDEX_VERSION:
            raise ValueError(f"{folder} was built by a newer embedkit (index version {info['version']}).")
        problem = _index_problem(folder, info, verify)
        if problem:
            raise ValueError(f"Index {folder} is damaged: {problem}. Rebuild it with `embedkit index build`.")
        manifest = json.loads((folder / "vectors.json").read_text(encoding="utf-8"))
        index_file = folder / "index.faiss"
        if mmap is None:
            mmap = index_file.stat().st_size >= MMAP_MIN_BYTES
        flags = 0
        if mmap:
            ivf = info["type"] in ("ivf", "ivfpq")
            flags = (faiss.IO_FLAG_MMAP if ivf else faiss.IO_FLAG_MMAP_IFC) | faiss.IO_FLAG_READ_ONLY
        faiss_index = faiss.read_index(str(index_file), flags)
        ids = np.load(folder / "ids.npy", mmap_mode="r", allow_pickle=False)
        texts = None
        if info.get("texts"):
            offsets = np.load(folder / "texts.offsets.npy", mmap_mode="r", allow_pickle=False)
            with open(folder / "texts.bin", "rb") as handle:
                data = _mmap.mmap(handle.fileno(), 0, access=_mmap.ACCESS_READ)
            texts = (offsets, data)
        return cls(folder, faiss_index, info, manifest, ids, texts, embedder, check_model)

    # -- properties ------------------------------------------------------------------------------------------
    @property
    def dimension(self) -> int:
        return int(self.info["dimension"])

    @property
    def metric(self) -> str:
        return self.info["metric"]

    @property
    def index_type(self) -> str:
        return self.info["type"]

    @property
    def has_texts(self) -> bool:
        return self._texts is not None

    def __len__(self) -> int:
        return int(self.faiss.ntotal)

    def id_at(self, position: int) -> str:
        return bytes(self._ids[position]).decode("utf-8")

    def text_at(self, position: int) -> str | None:
        if self._texts is None:
            return None
        offsets, data = self._texts
        return data[int(offsets[position]):int(offsets[position + 1])].decode("utf-8")

    # -- the query model ------------------------------------------------------------------------------------
    def _check_embedder(self, embedder) -> None:
        if embedder.dimension != self.dimension:
            raise ValueError(f"The query model gives {embedder.dimension}-d vectors but the index {self.folder} "
                             f"holds {self.dimension}-d vectors from {self.manifest['model']['spec']}: use that "
                             "model for queries.")
        expected = self.manifest["model"]["fingerprint"]
        if self.check_model and embedder.fingerprint() != expected:
            raise ValueError(f"The query model's fingerprint {embedder.fingerprint()} is not the one the index was "
                             f"built with ({expected}, {self.manifest['model']['spec']}): queries would land in "
                             "another vector space. Use the index's model, rebuild the index, or pass "
                             "check_model=False if you know they match.")

    @property
    def embedder(self):
        """The model that encoded the corpus, loaded on first use and checked against the manifest."""
        if self._embedder is None:
            embedder = load_manifest_embedder(self.manifest)
            self._check_embedder(embedder)
            self._embedder = embedder
        return self._embedder

    def encode_queries(self, texts: Sequence[str], instruction: str | None = None) -> np.ndarray:
        """Queries as the corpus model encodes them: its query instruction, the corpus's normalisation."""
        embedder = self.embedder
        instruction = embedder.config.query_instruction if instruction is None else instruction
        return embedder.encode(list(texts), instruction=instruction or None,
                               normalize=bool(self.manifest["normalized"]))

    # -- search ----------------------------------------------------------------------------------------------
    def search(self, queries: str | Sequence[str] | np.ndarray, k: int = 10, *, ef_search: int | None = None,
               nprobe: int | None = None, k_factor: int | None = None,
               instruction: str | None = None) -> list[list[Hit]]:
        """Top-``k`` hits per query (texts are encoded as queries; vectors are used as given). ``k`` beyond
        the corpus returns what exists. ``ef_search`` / ``nprobe`` / ``k_factor`` override the calibrated
        settings."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        if isinstance(queries, str):
            queries = [queries]
        if isinstance(queries, np.ndarray):
            vectors = np.atleast_2d(np.asarray(queries, dtype=np.float32))
            if vectors.shape[1] != self.dimension:
                raise ValueError(f"Query vectors have dimension {vectors.shape[1]}, the index {self.dimension}.")
            if self.manifest.get("normalized"):
                vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
        else:
            vectors = self.encode_queries(queries, instruction)
        scores, labels = self.search_vectors(vectors, k, ef_search=ef_search, nprobe=nprobe, k_factor=k_factor)
        results = []
        for row_scores, row_labels in zip(scores, labels, strict=True):
            hits = [Hit(self.id_at(int(p)), float(s), self.text_at(int(p)), int(p))
                    for s, p in zip(row_scores, row_labels, strict=True) if p >= 0]
            results.append(hits)
        return results

    def search_vectors(self, vectors: np.ndarray, k: int, *, ef_search: int | None = None,
                       nprobe: int | None = None, k_factor: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw FAISS search: (scores, positions) arrays, -1 where fewer than k rows were found."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        k_eff = max(1, min(k, len(self)))
        settings = dict(self.info.get("search", {}))
        overrides = {"efSearch": ef_search, "nprobe": nprobe, "k_factor": k_factor}
        names = _param_names(self.faiss)
        settings.update({n: v for n, v in overrides.items() if v is not None and n in names})
        if "efSearch" in names:
            settings["efSearch"] = max(settings.get("efSearch") or 16, k_eff)  # HNSW finds at most efSearch
        return self.faiss.search(vectors, k_eff, params=_search_params(self.faiss, settings))
