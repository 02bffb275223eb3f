"""Build: a FAISS index over a vectors source (type chosen, trained, filled, calibrated), and the index folder
written from a finished vectors folder (atomically: a temporary sibling folder renamed over the output)."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedkit.corpus.manifest import VectorSet, open_vectors
from embedkit.index.calibrate import calibrate
from embedkit.index.folder import (
    INDEX_FORMAT,
    INDEX_VERSION,
    file_facts,
    index_problem,
    write_ids,
    write_texts,
)
from embedkit.index.options import BuildOptions
from embedkit.index.registry import AUTO, IndexType, get_index_type
from embedkit.index.source import VectorSource, faiss_metric
from embedkit.index.types import choose_type, default_clusters
from embedkit.io import atomic_path, atomic_write_json, read_json, replace_dir

logger = logging.getLogger(__name__)

_STARTED = time.time()  # a temporary build folder last changed before this (and unlocked) is a dead run's


def resolve_type(index_type: str, count: int, dimension: int, precision: str = "float32") -> IndexType:
    """The registry entry for ``index_type`` (``auto``: chosen by size, memory and precision)."""
    return get_index_type(choose_type(count, dimension, precision=precision) if index_type == AUTO else index_type)


def factory_string(index_type: str, count: int, dimension: int, options: BuildOptions) -> tuple[str, int]:
    """(FAISS factory string, training rows) for a concrete type."""
    return get_index_type(index_type).factory(count, dimension, options)


def locality_order(source, metric: str, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Row positions grouped by k-means cluster (about sqrt(n) clusters, trained on a sample).

    HNSW adds rows in this order, so a graph's neighbours sit near each other in memory, and a search walks a
    few contiguous regions instead of the whole array (bench/README.md has the queries/s gain measured).
    """
    import faiss  # noqa: PLC0415

    source = VectorSource.of(source)
    began = time.perf_counter()
    clusters = default_clusters(source.count)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(source.count, size=min(source.count, 64 * clusters), replace=False))
    kmeans = faiss.Kmeans(source.dimension, clusters, niter=10, seed=seed, spherical=metric == "ip")
    kmeans.train(source.take(sample))
    assignment = np.concatenate([kmeans.index.search(chunk, 1)[1][:, 0] for chunk in source.chunks()])
    order = np.argsort(assignment, kind="stable")
    return order, {"clusters": clusters, "seconds": round(time.perf_counter() - began, 2)}


def _fill(index, kind: IndexType, source: VectorSource, options: BuildOptions, metric: str, facts: dict):
    """Add every row (labels = row positions); returns (index, locality-order facts or None)."""
    import faiss  # noqa: PLC0415

    if kind.add is not None:
        kind.add(index, source, facts)
        return index, None
    if not (kind.locality_order and options.locality_order):
        for chunk in source.chunks():
            index.add(chunk)
        return index, None
    order, order_info = locality_order(source, metric, options.seed)
    index = faiss.IndexIDMap(index)  # labels stay row positions
    # One add call: storage follows the order, but faiss shuffles the insertion order within a call. Added a chunk
    # at a time, clusters were inserted one after another and the graph was worse (bench/README.md). The price is
    # one float32 copy of the vectors while adding.
    index.add_with_ids(source.rows_in_order(order), order.astype(np.int64))
    return index, order_info


def build_faiss(vectors, options: BuildOptions | None = None, metric: str = "ip") -> tuple[object, dict]:
    """A FAISS index over ``vectors`` (array or VectorSet) whose labels are row positions, plus build facts
    (type, factory string, calibrated search parameter, seconds). Adds a chunk at a time."""
    import faiss  # noqa: PLC0415

    options = options or BuildOptions()
    renormalize = vectors.manifest["normalized"] if isinstance(vectors, VectorSet) else metric == "ip"
    source = vectors if isinstance(vectors, VectorSource) else VectorSource(vectors, options.dimensions, renormalize)
    began = time.perf_counter()
    kind = resolve_type(options.index_type, source.count, source.dimension, options.precision)
    factory, train_rows = kind.factory(source.count, source.dimension, options)
    if kind.create is not None:
        index = kind.create(source.dimension, factory, metric)
    else:
        index = faiss.index_factory(source.dimension, factory, faiss_metric(metric))
    if kind.prepare is not None:
        kind.prepare(index, options)
    train_seconds, facts = 0.0, {}
    if kind.train is not None:
        t0 = time.perf_counter()
        facts = kind.train(index, source, options)
        train_seconds = time.perf_counter() - t0
    elif not index.is_trained:
        rng = np.random.default_rng(options.seed)
        sample = np.sort(rng.choice(source.count, size=train_rows, replace=False))
        t0 = time.perf_counter()
        index.train(source.take(sample))
        train_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    index, order_info = _fill(index, kind, source, options, metric, facts)
    add_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    calibration = calibrate(index, kind, source, metric, options.target_recall, options.seed)
    info = {
        "type": kind.name, "factory": factory, "metric": metric, "count": int(index.ntotal),
        "dimension": source.dimension, "train_rows": train_rows, "precision": options.precision,
        "rescore_multiplier": calibration.get("rescore_multiplier", kind.rescore_multiplier), **facts,
        "search": calibration["settings"],
        "calibration": calibration,
        "locality_order": order_info,
        "seconds": {"train": round(train_seconds, 2), "add": round(add_seconds, 2),
                    "calibrate": round(time.perf_counter() - t0, 2),
                    "total": round(time.perf_counter() - began, 2)},
        "options": options.to_dict(),
    }
    return index, info


def _warn_untrained_width(manifest: dict, width: int) -> None:
    """The index build's twin of ``Embedder.encode``'s warning: a width the model's Matryoshka loss never saw."""
    trained = manifest["model"]["config"].get("matryoshka_dims")
    if trained and width not in trained:
        logger.warning("dimensions=%d is not one of the Matryoshka dims this model was trained with %s: its "
                       "truncated vectors may be much worse.", width, trained)


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
        if "rescore_recall_at_10" in cal:
            tuned += (f"; rescoring {info['rescore_multiplier']} x k gives recall@10 {cal['rescore_recall_at_10']:.3f}"
                      f" on {cal['probes']} corpus probes")
        texts = "with texts" if self.texts else f"without texts ({self.note})"
        return (f"Built {self.output}: {info['type']} ({info['factory']}, {info['metric']}) over {info['count']} "
                f"vectors x {info['dimension']} in {info['seconds']['total']:.1f} s{tuned}; {texts}.")


# -- temporary build folders ---------------------------------------------------------------------------------------
def _lock_dir(folder: Path) -> int:
    """Hold an exclusive advisory lock on ``folder`` (released when the fd is closed or the process dies)."""
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def remove_stale_builds(output: Path) -> int:
    """Delete the temporary folders (``.<output name>.XXXXXXXX``) of ``index build`` runs that died: those no live
    run holds locked and that last changed before this process started. Returns how many."""
    pattern = re.compile(rf"\.{re.escape(output.name)}\.[A-Za-z0-9_]{{8}}")
    removed = 0
    for tmp in output.parent.glob(f".{output.name}.*"):
        if not (pattern.fullmatch(tmp.name) and tmp.is_dir()) or tmp.stat().st_mtime >= _STARTED:
            continue
        try:
            fd = _lock_dir(tmp)
        except OSError:  # a live build holds it (or it vanished)
            continue
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            removed += 1
        finally:
            os.close(fd)
    if removed:
        logger.info("Removed %d temporary folder(s) of killed `index build` runs beside %s.", removed, output)
    return removed


def _current(output: Path, wanted: dict) -> dict | None:
    """The index at ``output`` if it was built from ``wanted`` and every file matches its sha256; else None (an
    empty folder is removed; a damaged index is rebuilt)."""
    if not output.exists():
        return None
    current = read_json(output / "index.json")
    if current is None:
        if output.is_dir() and not any(output.iterdir()):
            output.rmdir()
            return None
        raise ValueError(f"{output} exists and is not an embedkit index folder: choose another --output.")
    if current.get("source") != wanted:
        return None
    problem = index_problem(output, current, "full")
    if problem:
        logger.warning("Rebuilding %s: %s.", output, problem)
        return None
    return current


def build_index(
    vectors_dir: str | os.PathLike,
    output: str | os.PathLike,
    options: BuildOptions | None = None,
    *,
    texts: bool = True,
    verify: bool = True,
) -> BuildResult:
    """Build an index folder from a finished vectors folder; written to a temporary folder and renamed.

    Rebuilding with the same vectors and options does nothing (once every file's checksum matched); another
    embedkit index at ``output`` is replaced. Temporary folders of killed builds beside ``output`` are removed.
    """
    options = options or BuildOptions()
    vset = open_vectors(vectors_dir, verify=verify)
    manifest = vset.manifest
    metric = options.metric or manifest["metric"]
    output = Path(output)
    wanted = {"job": manifest["job"], "finished": manifest["finished"], "options": options.to_dict(), "metric": metric,
              "texts": texts}
    current = _current(output, wanted)
    if current is not None:
        return BuildResult(output, current, bool(current.get("texts")), up_to_date=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(output)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    lock = _lock_dir(tmp)
    try:
        info, note = _write_folder(tmp, vset, options, metric, texts)
        info["source"] = wanted
        info["vectors_dir"] = str(Path(vectors_dir).resolve())
        info["files"] = file_facts(tmp)
        atomic_write_json(tmp / "index.json", info)
        replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    return BuildResult(output, info, note is None, note=note)


def _write_folder(tmp: Path, vset, options: BuildOptions, metric: str, texts: bool) -> tuple[dict, str | None]:
    """Every file but index.json into ``tmp``; returns (index.json facts so far, why texts are missing)."""
    import faiss  # noqa: PLC0415

    manifest = vset.manifest
    index, info = build_faiss(vset, options, metric)
    kind = get_index_type(info["type"])
    with atomic_path(tmp / "index.faiss") as path:
        (kind.write or faiss.write_index)(index, str(path))
    del index
    ids = vset.ids()
    write_ids(tmp, ids)
    note = write_texts(tmp, manifest, ids) if texts else "--no-texts"
    if note and texts:
        logger.warning("Index without texts: %s.", note)
    atomic_write_json(tmp / "vectors.json", manifest)
    info.update({
        "format": INDEX_FORMAT, "version": INDEX_VERSION, "texts": note is None, "texts_note": note,
        "model": {"spec": manifest["model"]["spec"], "fingerprint": manifest["model"]["fingerprint"]},
        "normalized": manifest["normalized"],
        "source_dimension": vset.dimension, "model_dimension": vset.model_dimension,
        "bytes_per_vector": round((tmp / "index.faiss").stat().st_size / max(1, info["count"]), 2),
    })
    if info["dimension"] != vset.model_dimension:
        _warn_untrained_width(manifest, info["dimension"])
    return info, note
