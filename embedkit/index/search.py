"""Load a built index folder (checked, memory-mapped when large) and search it by text or by vector."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedkit.embedder import open_model
from embedkit.index.folder import INDEX_FORMAT, INDEX_VERSION, StoredIds, index_problem, open_texts
from embedkit.index.registry import IndexType, all_knobs, get_index_type
from embedkit.index.rescore import RescoreVectors, check_multiplier, rescore
from embedkit.io import read_json
from embedkit.method_registry import apply_methods

MMAP_MIN_BYTES = 256 << 20  # Index.load memory-maps index files at least this large (mmap=None)


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
        embedder.config.methods = dict(cfg["methods"])
        apply_methods(embedder)
    embedder.config.backbone = cfg["backbone"]  # the label it was encoded under (part of the fingerprint)
    return embedder


def _read_info(folder: Path) -> dict:
    info = read_json(folder / "index.json")
    if info is None or info.get("format") != INDEX_FORMAT:
        raise FileNotFoundError(f"{folder} is not an embedkit index folder (no valid index.json): build one "
                                "with `embedkit index build VECTORS_DIR --output INDEX_DIR`.")
    if info.get("version", 0) > INDEX_VERSION:
        raise ValueError(f"{folder} was built by a newer embedkit (index version {info['version']}).")
    return info


def verify_index(path: str | os.PathLike, full: bool = True) -> dict:
    """Check every file of an index folder against the SHA-256 in its index.json (``full=False``: the cheap
    sampled check ``Index.load`` does); returns index.json, or raises a one-line ValueError naming the bad file."""
    folder = Path(path)
    info = _read_info(folder)
    problem = index_problem(folder, info, "full" if full else "sample")
    if problem:
        raise ValueError(f"Index {folder} is damaged: {problem}. Rebuild it with `embedkit index build`.")
    return info


def _read_faiss(path: Path, kind: IndexType, mmap: bool | None):
    import faiss  # noqa: PLC0415

    if mmap is None:
        mmap = path.stat().st_size >= MMAP_MIN_BYTES
    flags = getattr(faiss, kind.mmap) | faiss.IO_FLAG_READ_ONLY if mmap and kind.mmap else 0
    return (kind.read or faiss.read_index)(str(path), flags)


class Index:
    """A built index folder, ready to search by text (encoded by the corpus's own model) or by vector."""

    def __init__(self, folder: Path, faiss_index, info: dict, manifest: dict, ids: StoredIds,
                 texts: tuple | None, embedder=None, check_model: bool = True):
        self.folder = folder
        self.faiss = faiss_index
        self.info = info
        self.manifest = manifest
        self._ids = ids
        self._texts = texts
        self._embedder = None
        self._rescore_vectors: RescoreVectors | None = None
        self.check_model = check_model
        if embedder is not None:
            self._check_embedder(embedder)
            self._embedder = embedder

    @classmethod
    def load(cls, path: str | os.PathLike, *, embedder=None, mmap: bool | None = None, verify: bool = False,
             check_model: bool = True) -> Index:
        """Open an index folder. Its files are checked against index.json first: by default sizes plus a hash of
        each file's header and sampled blocks (whole files up to 4 MiB), ``verify=True`` hashes every byte.
        ``mmap`` (default: for files >= 256 MB) maps the FAISS file instead of reading it into RAM, for the
        types that allow it; ``embedder`` overrides the manifest's model for queries (it must match it unless
        ``check_model=False``)."""
        folder = Path(path)
        info = verify_index(folder, full=verify)
        kind = get_index_type(info["type"])
        manifest = json.loads((folder / "vectors.json").read_text(encoding="utf-8"))
        faiss_index = _read_faiss(folder / "index.faiss", kind, mmap)
        if kind.restore is not None:
            kind.restore(faiss_index, info)
        texts = open_texts(folder) if info.get("texts") else None
        return cls(folder, faiss_index, info, manifest, StoredIds(folder), texts, embedder, check_model)

    @property
    def dimension(self) -> int:
        return int(self.info["dimension"])

    @property
    def model_dimension(self) -> int:
        """The query model's width (above ``dimension`` when the index holds Matryoshka-cut vectors)."""
        return int(self.info.get("model_dimension", self.manifest.get("model_dimension", self.dimension)))

    @property
    def precision(self) -> str:
        """What the index stores (``float32`` for folders from before precisions)."""
        return self.info.get("precision", "float32")

    @property
    def metric(self) -> str:
        return self.info["metric"]

    @property
    def index_type(self) -> str:
        return self.info["type"]

    @property
    def kind(self) -> IndexType:
        """The registry entry of this index's type."""
        return get_index_type(self.info["type"])

    @property
    def has_texts(self) -> bool:
        return self._texts is not None

    def __len__(self) -> int:
        return int(self.faiss.ntotal)

    def id_at(self, position: int) -> str:
        return self._ids[position]

    def text_at(self, position: int) -> str | None:
        if self._texts is None:
            return None
        offsets, data = self._texts
        return data[int(offsets[position]):int(offsets[position + 1])].decode("utf-8")

    # -- the query model ------------------------------------------------------------------------------------
    def _check_embedder(self, embedder) -> None:
        if embedder.dimension != self.model_dimension:
            raise ValueError(f"The query model gives {embedder.dimension}-d vectors but the index {self.folder} "
                             f"holds {self.model_dimension}-d vectors from {self.manifest['model']['spec']}"
                             + (f" (cut to {self.dimension})" if self.dimension != self.model_dimension else "")
                             + ": use that model for queries.")
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
                               normalize=bool(self.manifest["normalized"]),
                               dimensions=self.dimension if self.dimension < embedder.dimension else None)

    # -- search ----------------------------------------------------------------------------------------------
    def search(self, queries: str | Sequence[str] | np.ndarray, k: int = 10, *, ef_search: int | None = None,
               nprobe: int | None = None, k_factor: int | None = None, instruction: str | None = None,
               rescore_multiplier: int | None = None, **knobs: int | None) -> list[list[Hit]]:
        """Top-``k`` hits per query (texts are encoded as queries at the index's width; vectors are used as given,
        or cut to the index's Matryoshka width when they have the model's). ``k`` beyond the corpus returns what
        exists. ``ef_search`` / ``nprobe`` / ``k_factor`` (and a plug-in type's own search settings, by keyword)
        override the calibrated settings; ``rescore_multiplier`` the index's rescoring depth (0 = off)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        overrides = _check_overrides({"ef_search": ef_search, "nprobe": nprobe, "k_factor": k_factor, **knobs})
        check_multiplier(rescore_multiplier)
        if isinstance(queries, str):
            queries = [queries]
        if isinstance(queries, np.ndarray):
            vectors = np.atleast_2d(np.asarray(queries, dtype=np.float32))
            if vectors.shape[1] == self.model_dimension != self.dimension:  # the model's width: cut (Matryoshka)
                vectors = vectors[:, :self.dimension]
            if vectors.shape[1] != self.dimension:
                raise ValueError(f"Query vectors have dimension {vectors.shape[1]}, the index {self.dimension}.")
            if self.manifest.get("normalized"):
                vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
        else:
            vectors = self.encode_queries(queries, instruction)
        scores, labels = self.search_vectors(vectors, k, rescore_multiplier=rescore_multiplier, **overrides)
        results = []
        for row_scores, row_labels in zip(scores, labels, strict=True):
            hits = [Hit(self.id_at(int(p)), float(s), self.text_at(int(p)), int(p))
                    for s, p in zip(row_scores, row_labels, strict=True) if p >= 0]
            results.append(hits)
        return results

    def search_vectors(self, vectors: np.ndarray, k: int, rescore_multiplier: int | None = None,
                       **overrides: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Raw search: (scores, positions) arrays, -1 where fewer than k rows were found. ``overrides``: search
        settings by keyword (``ef_search``, ``nprobe``, ``k_factor``); those the type lacks are ignored.
        ``rescore_multiplier`` (default: the index's; 0 = off): find that many times ``k`` candidates, return
        the ``k`` best by float query x stored vectors (``rescore.py``)."""
        overrides = _check_overrides(overrides)
        multiplier = check_multiplier(rescore_multiplier)
        multiplier = int(self.info.get("rescore_multiplier", 0)) if multiplier is None else multiplier
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if multiplier > 0:
            _, candidates = self._search(vectors, k * multiplier, overrides)
            return rescore(vectors, candidates, self.rescore_vectors, max(1, min(k, len(self))), self.metric)
        return self._search(vectors, k, overrides)

    @property
    def rescore_vectors(self) -> RescoreVectors:
        """The vectors folder this index was built from, opened (memory-mapped) on the first rescored search."""
        if self._rescore_vectors is None:
            self._rescore_vectors = RescoreVectors(self.info)
        return self._rescore_vectors

    def _search(self, vectors: np.ndarray, k: int, overrides: dict) -> tuple[np.ndarray, np.ndarray]:
        k_eff = max(1, min(k, len(self)))
        settings = dict(self.info.get("search", {}))
        kind = self.kind
        for knob in kind.knobs:
            if overrides.get(knob.keyword) is not None:
                settings[knob.name] = overrides[knob.keyword]
        settings = kind.settings_finding(settings, k_eff)
        return self.faiss.search(vectors, k_eff, params=kind.faiss_params(self.faiss, settings))


def _check_overrides(overrides: dict) -> dict:
    """Search settings by keyword, each a known one with a valid value (FAISS crashes or hangs on 0 or less)."""
    knobs = {knob.keyword: knob for knob in all_knobs()}
    for keyword, value in overrides.items():
        if keyword not in knobs:
            raise TypeError(f"Unknown search setting {keyword!r}; known: {', '.join(knobs)}.")
        knobs[keyword].check(value)
    return overrides
