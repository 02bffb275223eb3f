"""Local task folders (the ``../shared/data`` layout) as MTEB tasks.

A folder with a ``task.json`` becomes a subclass of the matching mteb ``AbsTask*`` whose ``load_data`` reads the
local files, so mteb's own evaluators compute the scores and nothing is fetched from the hub. Folders are checked
(``task.json`` fields, data files) before any model loads, so a bad folder fails in a second, naming the file.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from embedkit.datasets import read_jsonl_lines, sts_row
from embedkit.io import safe_name

logger = logging.getLogger(__name__)

TASK_FILE = "task.json"
EVAL_SPLIT = "test"
CLUSTERING_MAX_DOCUMENTS = 2048  # mteb's *.v2 clustering tasks subsample (stratified) to this many documents


@dataclass(frozen=True)
class TaskType:
    """What each local type maps to in mteb, and what its folder must hold."""

    mteb_type: str
    category: str
    main_score: str
    main_scores: tuple[str, ...]  # metrics mteb reports for the type that may be named as main_score
    files: tuple[str, ...]  # required files; {split} = the evaluation split
    fields: dict[str, tuple[str, ...]] = field(default_factory=dict)  # file -> required row keys


_CORR = tuple(f"{sim}_{corr}" for sim in ("cosine", "manhattan", "euclidean") for corr in ("spearman", "pearson"))
_PAIR = tuple(f"{sim}_{m}" for sim in ("max", "cosine", "dot", "manhattan", "euclidean", "similarity")
              for m in ("ap", "f1", "accuracy", "precision", "recall"))
_RETRIEVAL = tuple(f"{m}_at_{k}" for m in ("ndcg", "map", "recall", "precision", "mrr")
                   for k in (1, 3, 5, 10, 20, 100, 1000))

TASK_TYPES: dict[str, TaskType] = {
    "sts": TaskType("STS", "t2t", "cosine_spearman", (*_CORR, "spearman", "pearson"), ("{split}.jsonl",),
                    {"{split}.jsonl": ("sentence1", "sentence2", "score")}),
    "retrieval": TaskType("Retrieval", "t2t", "ndcg_at_10", _RETRIEVAL,
                          ("corpus.jsonl", "queries.jsonl", "qrels/{split}.tsv"),
                          {"corpus.jsonl": ("_id", "text"), "queries.jsonl": ("_id", "text")}),
    "classification": TaskType("Classification", "t2c", "accuracy",
                               ("accuracy", "f1", "f1_weighted", "precision", "precision_weighted", "recall",
                                "recall_weighted"), ("train.jsonl", "{split}.jsonl"),
                               {"train.jsonl": ("text", "label"), "{split}.jsonl": ("text", "label")}),
    "clustering": TaskType("Clustering", "t2c", "v_measure", ("v_measure", "ami"), ("{split}.jsonl",),
                           {"{split}.jsonl": ("text", "label")}),
    "pair_classification": TaskType("PairClassification", "t2t", "max_ap", _PAIR, ("{split}.jsonl",),
                                    {"{split}.jsonl": ("sentence1", "sentence2", "label")}),
}
TRAINING_TYPES = ("triplets", "unlabeled")  # valid in the data layout, but training data, not evaluation tasks


class TaskFolderError(ValueError):
    """A task folder is unusable; the message names the file (and field) and how to fix it."""


@dataclass(frozen=True)
class LocalTask:
    """A validated task folder."""

    name: str
    type: str
    path: Path
    main_score: str
    info: dict
    split: str = EVAL_SPLIT

    @property
    def spec(self) -> TaskType:
        return TASK_TYPES[self.type]

    def file(self, pattern: str) -> Path:
        return self.path / pattern.format(split=self.split)

    def checksum(self) -> str:
        """sha256 over every file's relative path and bytes: equal checksums mean equal task data."""
        return folder_checksum(self.path)


def folder_checksum(folder: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    folder = Path(folder)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts):
            continue
        digest.update(rel.encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


# -- reading and checking task folders -----------------------------------------------------------------------
def read_task(folder: str | os.PathLike) -> LocalTask:
    """Check a task folder (task.json fields, data files present) and describe it."""
    folder = Path(folder)
    meta_path = folder / TASK_FILE
    if not folder.is_dir():
        raise TaskFolderError(f"Task folder {folder} does not exist.")
    if not meta_path.is_file():
        raise TaskFolderError(f"{meta_path} is missing: every task folder needs a {TASK_FILE} "
                              "(see ../shared/data/README.md for the layout).")
    try:
        info = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TaskFolderError(f"{meta_path} is not valid JSON ({err}).") from None
    if not isinstance(info, dict):
        raise TaskFolderError(f"{meta_path} must hold a JSON object, got {type(info).__name__}.")
    for key in ("name", "type"):
        if not isinstance(info.get(key), str) or not info[key].strip():
            raise TaskFolderError(f"{meta_path}: field '{key}' is missing or not a non-empty string.")
    try:  # results are written as OUTPUT/mteb/<name>.json: a name with '/' or '..' would write elsewhere
        safe_name(info["name"].strip(), "task name")
    except ValueError as err:
        raise TaskFolderError(f"{meta_path}: field 'name': {err}") from None
    kind = info["type"]
    if kind in TRAINING_TYPES:
        raise TaskFolderError(f"{meta_path}: type '{kind}' is training data, not an evaluation task; "
                              f"evaluation types: {', '.join(TASK_TYPES)}.")
    if kind not in TASK_TYPES:
        near = difflib.get_close_matches(kind, TASK_TYPES, n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        raise TaskFolderError(f"{meta_path}: field 'type' is '{kind}', an unknown task type; valid: "
                              f"{', '.join(TASK_TYPES)}.{hint}")
    spec = TASK_TYPES[kind]
    main_score = info.get("main_score", spec.main_score)
    if main_score not in spec.main_scores:
        raise TaskFolderError(f"{meta_path}: field 'main_score' is {main_score!r}, which mteb does not report for "
                              f"{kind} tasks; use '{spec.main_score}' (or one of: {', '.join(spec.main_scores)}).")
    if kind == "sts":
        for key in ("min_score", "max_score"):
            value = info.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TaskFolderError(f"{meta_path}: field '{key}' is missing or not a number (sts tasks need "
                                      "min_score and max_score, the gold score range).")
        if info["min_score"] >= info["max_score"]:
            raise TaskFolderError(f"{meta_path}: field 'min_score' ({info['min_score']}) must be below "
                                  f"'max_score' ({info['max_score']}).")
    task = LocalTask(name=info["name"].strip(), type=kind, path=folder.resolve(), main_score=main_score, info=info)
    for pattern in spec.files:
        if not task.file(pattern).is_file():
            raise TaskFolderError(f"{task.file(pattern)} is missing: {kind} tasks need "
                                  + ", ".join(p.format(split=task.split) for p in spec.files) + f" in {folder}.")
    return task


def _is_task_folder(folder: Path) -> bool:
    return (folder / TASK_FILE).is_file()


def find_tasks(paths: Iterable[str | os.PathLike]) -> list[LocalTask]:
    """Task folders from ``--task-dir`` arguments: a task folder, or a folder searched for task folders.

    In a searched folder, training-data folders (triplets, unlabeled) are skipped; named explicitly they are an
    error. Two tasks with the same name are an error (results are keyed by task name).
    """
    tasks: list[LocalTask] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise TaskFolderError(f"Task folder {path} does not exist.")
        if _is_task_folder(path):
            tasks.append(read_task(path))
            continue
        found = sorted(p.parent for p in path.rglob(TASK_FILE))
        evaluable = []
        for folder in found:
            try:
                kind = json.loads((folder / TASK_FILE).read_text(encoding="utf-8")).get("type")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                kind = None  # read_task reports it properly
            if kind in TRAINING_TYPES:
                logger.info("Skipping %s (type %s: training data).", folder, kind)
                continue
            evaluable.append(read_task(folder))
        if not evaluable:
            raise TaskFolderError(f"{path} holds no evaluation task folder (no */{TASK_FILE} of type "
                                  f"{', '.join(TASK_TYPES)}).")
        tasks += evaluable
    check_unique(t.name for t in tasks)
    return tasks


def check_unique(names: Iterable[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise TaskFolderError(f"Task name '{name}' appears twice; results are stored by task name, so give "
                                  "each task folder a distinct 'name' in its task.json.")
        seen.add(name)


# -- loading rows ---------------------------------------------------------------------------------------------
def _numbered_rows(task: LocalTask, pattern: str) -> list[tuple[str, dict]]:
    """("file:line", row) of one data file, every row holding the type's required fields."""
    path = task.file(pattern)
    required = task.spec.fields.get(pattern, ())
    rows = []
    for number, (line, row) in enumerate(read_jsonl_lines(path), start=1):
        missing = [key for key in required if not isinstance(row, dict) or key not in row]
        if missing:
            raise TaskFolderError(f"{path}: row {number} lacks field(s) {missing} (rows need {list(required)}).")
        rows.append((f"{path}:{line}", row))
    if not rows:
        raise TaskFolderError(f"{path} has no rows.")
    return rows


def _rows(task: LocalTask, pattern: str) -> list[dict]:
    return [row for _, row in _numbered_rows(task, pattern)]


def _label_ids(*splits: list[dict]) -> list[list[int]]:
    """String labels -> ints over one sorted label set (sklearn's binary metrics reject string labels)."""
    names = sorted({str(r["label"]) for rows in splits for r in rows})
    index = {name: i for i, name in enumerate(names)}
    return [[index[str(r["label"])] for r in rows] for rows in splits]


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = next(reader, None)
        if header != ["query-id", "corpus-id", "score"]:
            raise TaskFolderError(f"{path}: the first line must be the header 'query-id<TAB>corpus-id<TAB>score', "
                                  f"got {header!r}.")
        for number, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 3:
                raise TaskFolderError(f"{path}:{number}: expected 3 tab-separated columns, got {len(row)}.")
            try:
                score = int(row[2])
            except ValueError:
                raise TaskFolderError(f"{path}:{number}: score {row[2]!r} is not an integer.") from None
            qrels.setdefault(row[0], {})[row[1]] = score
    return qrels


def _sts_columns(task: LocalTask) -> dict[str, list]:
    checked = []
    for where, row in _numbered_rows(task, "{split}.jsonl"):
        try:
            checked.append(sts_row(row, where))
        except ValueError as err:
            raise TaskFolderError(str(err)) from None
    return {"sentence1": [c[0] for c in checked], "sentence2": [c[1] for c in checked],
            "score": [c[2] for c in checked]}


def _retrieval_columns(task: LocalTask) -> dict:
    corpus, queries = _rows(task, "corpus.jsonl"), _rows(task, "queries.jsonl")
    qrels = read_qrels(task.file("qrels/{split}.tsv"))
    doc_ids = {str(r["_id"]) for r in corpus}
    unknown = sorted({d for docs in qrels.values() for d in docs} - doc_ids)
    if unknown:
        raise TaskFolderError(f"{task.file('qrels/{split}.tsv')}: {len(unknown)} corpus-id(s) not in "
                              f"corpus.jsonl, e.g. {unknown[:3]}.")
    return {"corpus": {"id": [str(r["_id"]) for r in corpus], "title": [r.get("title") or "" for r in corpus],
                       "text": [r["text"] for r in corpus]},
            "queries": {"id": [str(r["_id"]) for r in queries], "text": [r["text"] for r in queries]},
            "qrels": qrels}


def read_task_rows(task: LocalTask) -> dict:
    """The task's data as plain columns, every row checked; errors name the file and row. The eval command
    calls it before any model loads, so bad data fails in seconds. Returns split -> column -> values (retrieval:
    corpus, queries, qrels)."""
    split = task.split
    if task.type == "sts":
        return {split: _sts_columns(task)}
    if task.type == "pair_classification":
        rows = _rows(task, "{split}.jsonl")
        bad = next((i for i, r in enumerate(rows, 1) if r["label"] not in (0, 1)), None)
        if bad is not None:
            raise TaskFolderError(f"{task.file('{split}.jsonl')}: row {bad} has label {rows[bad - 1]['label']!r}; "
                                  "pair_classification labels must be 0 or 1.")
        return {split: {"sentence1": [r["sentence1"] for r in rows], "sentence2": [r["sentence2"] for r in rows],
                        "label": [int(r["label"]) for r in rows]}}
    if task.type == "classification":
        train, test = _rows(task, "train.jsonl"), _rows(task, "{split}.jsonl")
        train_ids, test_ids = _label_ids(train, test)
        return {"train": {"text": [r["text"] for r in train], "label": train_ids},
                split: {"text": [r["text"] for r in test], "label": test_ids}}
    if task.type == "clustering":
        rows = _rows(task, "{split}.jsonl")
        (labels,) = _label_ids(rows)
        return {split: {"text": [r["text"] for r in rows], "label": labels}}
    if task.type == "retrieval":
        return _retrieval_columns(task)
    raise TaskFolderError(f"Unknown task type {task.type!r}.")  # pragma: no cover - read_task checked it


def load_task_data(task: LocalTask):
    """The task's data in the shape its mteb AbsTask expects (DatasetDict, or subset -> split -> split data)."""
    from datasets import Dataset, DatasetDict  # noqa: PLC0415

    columns = read_task_rows(task)
    if task.type != "retrieval":
        return DatasetDict({split: Dataset.from_dict(data) for split, data in columns.items()})
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: PLC0415

    return {"default": {task.split: RetrievalSplitData(
        corpus=Dataset.from_dict(columns["corpus"]), queries=Dataset.from_dict(columns["queries"]),
        relevant_docs=columns["qrels"], top_ranked=None)}}


# -- mteb task classes ------------------------------------------------------------------------------------------
def to_mteb_task(task: LocalTask, checksum: str | None = None):
    """An mteb task object for a local task folder (a class of its own per folder, metadata on the class)."""
    from mteb.abstasks import (  # noqa: PLC0415
        AbsTaskClassification,
        AbsTaskClustering,
        AbsTaskPairClassification,
        AbsTaskRetrieval,
        AbsTaskSTS,
    )
    from mteb.abstasks.task_metadata import TaskMetadata  # noqa: PLC0415

    spec = task.spec
    checksum = checksum or task.checksum()
    description = str(task.info.get("description") or f"Local {task.type} task {task.name}.")
    metadata = TaskMetadata(
        name=task.name, description=description, reference=None,
        dataset={"path": str(task.path), "revision": checksum},
        type=spec.mteb_type, category=spec.category, modalities=["text"],
        eval_splits=[task.split], eval_langs=list(task.info.get("languages") or ["eng-Latn"]),
        main_score=task.main_score, date=None, domains=None, task_subtypes=None, license=None,
        annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation="",
    )
    attrs: dict = {"metadata": metadata, "local_task": task}
    base = {"sts": AbsTaskSTS, "retrieval": AbsTaskRetrieval, "classification": AbsTaskClassification,
            "clustering": AbsTaskClustering, "pair_classification": AbsTaskPairClassification}[task.type]
    if task.type == "sts":
        attrs.update(min_score=task.info["min_score"], max_score=task.info["max_score"])
    elif task.type == "pair_classification":
        attrs.update(label_column_name="label")
    elif task.type == "classification":
        attrs.update(input_column_name="text", label_column_name="label")
    elif task.type == "clustering":
        attrs.update(input_column_name="text", label_column_name="label", max_fraction_of_documents_to_embed=None,
                     max_document_to_embed=None)

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        if self.data_loaded:
            return
        data = load_task_data(self.local_task)
        if self.local_task.type == "clustering" and len(data[self.local_task.split]) > CLUSTERING_MAX_DOCUMENTS:
            data = self.stratified_subsampling(data, self.seed, [self.local_task.split], label="label",
                                               n_samples=CLUSTERING_MAX_DOCUMENTS)
        self.dataset = data
        self.data_loaded = True

    attrs["load_data"] = load_data
    cls = type(f"Local{base.__name__.removeprefix('AbsTask')}_{_identifier(task.name)}", (base,), attrs)
    return cls()


def _identifier(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def suggest(name: str, candidates: Sequence[str], n: int = 5) -> list[str]:
    """Near matches of a name (case-insensitive), best first."""
    lower = {c.lower(): c for c in candidates}
    hits = difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.6)
    subs = [c for c in candidates if name.lower() in c.lower() and c.lower() not in hits]
    return [lower[h] for h in hits] + subs[: max(0, n - len(hits))]
