"""Calibration: the cheapest search settings of an approximate index that reach a target recall@10.

FAISS leaves ``efSearch`` / ``nprobe`` (/ the re-ranking depth) to the user; we measure them instead, on probe
queries made from the corpus itself, so an index ships with search settings that were measured, not guessed.
Compact indexes that rescore by default (binary) get their rescoring depth measured the same way: how many
candidates a query needs grows with the corpus (bench/README.md, "Compact indexes").
"""

from __future__ import annotations

import logging

import numpy as np

from embedkit.index.registry import IndexType
from embedkit.index.rescore import rescore
from embedkit.index.source import VectorSource, exact_knn

logger = logging.getLogger(__name__)

PROBES = 200
CALIBRATION_K = 10
RESCORE_DEPTHS = (4, 10, 20, 50, 100)  # rescoring depths tried (x k candidates), from the type's default up


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the true neighbours (``truth``, -1 = none) that ``found`` holds, over all queries."""
    hits = sum(len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) for f, t in zip(found, truth, strict=True))
    return hits / max(1, sum(int((t >= 0).sum()) for t in truth))


def calibration_probes(source, metric: str, seed: int = 0, probes: int = PROBES) -> tuple[np.ndarray, np.ndarray]:
    """Probe queries that are not corpus rows, and their exact top-10 (positions).

    A corpus row used as its own query is found at once by HNSW (it is a graph node whose links are its
    neighbours), so recall measured that way is far too optimistic. Each probe is a corpus row moved by random
    noise as long as the distance to its nearest other row, i.e. a new point at the corpus's own spacing.
    """
    source = VectorSource.of(source)
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


def _search_steps(index, kind: IndexType, measure, target: float) -> dict | None:
    """Walk the first knob's steps, cheapest first; with a second knob (re-ranking depth), first ask whether the
    target is reachable at this step with its deepest value, then take its smallest value that reaches it."""
    first, *rest = kind.knobs
    for value in first.steps(index):
        settings = {first.name: value}
        if not rest:
            if measure(settings) >= target:
                return settings
            continue
        depth = rest[0]
        depths = depth.steps(index)
        if measure({**settings, depth.name: depths[-1]}) >= target:
            for factor in depths:
                if measure({**settings, depth.name: factor}) >= target:
                    return {**settings, depth.name: factor}
            return None
    return None


def calibrate(index, kind: IndexType, source, metric: str, target: float, seed: int = 0,
              probes: int = PROBES) -> dict:
    """Cheapest search settings of ``index`` (of type ``kind``) whose recall@10 against exact search reaches
    ``target`` on corpus probes; every point measured is kept in ``curve``. A type that rescores by default is
    measured as it searches, rescored at its least depth; then the smallest depth that reaches the target is
    chosen (``rescore_multiplier``, its points in ``rescore_curve``)."""
    source = VectorSource.of(source)
    queries, truth = calibration_probes(source, metric, seed, probes)
    k = truth.shape[1]
    if k < 1:
        return {"settings": {}, "recall_at_10": 1.0, "probes": len(queries)}
    curve: list[list] = []

    def measure(settings: dict) -> float:
        if kind.rescore_multiplier:
            value = _rescored_recall(index, kind, source, metric, settings, queries, truth, kind.rescore_multiplier)
        else:
            _, labels = index.search(queries, k, params=kind.faiss_params(index, settings))
            value = recall(labels, truth)
        curve.append([dict(settings), round(value, 4)])
        return value

    if not kind.knobs:
        result = {"settings": {}, "recall_at_10": round(measure({}), 4), "probes": len(queries)}
    else:
        best = _search_steps(index, kind, measure, target)
        if best is None:  # target not reached: the most accurate setting seen (PQ recall can fall with nprobe)
            best = max(curve, key=lambda point: point[1])[0]
        reached = next(r for s, r in reversed(curve) if s == best)
        if reached < target and not kind.rescore_multiplier:  # a rescoring type may reach it deeper: said below
            logger.warning("Calibration: %s reaches recall@10 %.3f only (target %.2f); searches use it.", best,
                           reached, target)
        result = {"settings": best, "recall_at_10": reached, "probes": len(queries), "target": target,
                  "curve": curve}
    if kind.rescore_multiplier:
        result.update(_rescoring_depth(index, kind, source, metric, target, result["settings"], queries, truth))
    return result


class _SourceRows:
    """``rescore``'s view of the rows being indexed (the vectors folder is read the same way at search time)."""

    def __init__(self, source: VectorSource):
        self.source = source

    def rows(self, positions: np.ndarray) -> np.ndarray:
        return self.source.take(positions)


def _rescored_recall(index, kind: IndexType, source: VectorSource, metric: str, settings: dict, queries: np.ndarray,
                     truth: np.ndarray, depth: int) -> float:
    """Recall@10 searched as ``Index.search_vectors`` does: depth x k candidates, reordered by float scores."""
    k = truth.shape[1]
    wanted = min(k * depth, source.count)
    settings = kind.settings_finding(settings, wanted)  # as in search: HNSW finds at most efSearch rows
    _, candidates = index.search(queries, wanted, params=kind.faiss_params(index, settings))
    _, found = rescore(queries, candidates, _SourceRows(source), k, metric)
    return recall(found, truth)


def _rescoring_depth(index, kind: IndexType, source: VectorSource, metric: str, target: float, settings: dict,
                     queries: np.ndarray, truth: np.ndarray) -> dict:
    """The smallest of ``RESCORE_DEPTHS`` from the type's default up whose rescored recall@10 reaches ``target``
    (else the deepest, with a warning). The default is a floor: on an LLM's MSMARCO vectors the probes flattered
    the real queries below it (bench/README.md, "Compact indexes"); on dense clustered sets they ask for more."""
    curve: list[list] = []
    for depth in (d for d in RESCORE_DEPTHS if d >= kind.rescore_multiplier):
        curve.append([depth, round(_rescored_recall(index, kind, source, metric, settings, queries, truth, depth), 4)])
        if curve[-1][1] >= target or truth.shape[1] * depth >= source.count:
            break
    depth, reached = curve[-1]
    if reached < target:
        logger.warning("Calibration: rescoring %d x k candidates reaches recall@10 %.3f only (target %.2f); searches "
                       "use it.", depth, reached, target)
    return {"rescore_multiplier": depth, "rescore_recall_at_10": reached, "rescore_curve": curve}
