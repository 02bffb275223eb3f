"""Run mteb's evaluators on local task folders (and standard mteb tasks when their data can be had).

One ``mteb.evaluate`` call per task, without mteb's result cache (which writes to ~/.cache/mteb and in place):
the harness writes each task's mteb result JSON itself, atomically, under ``OUTPUT/mteb/``, plus ``run.json``
(model fingerprint, task checksums, time per task, scores) and the summary table and chart. A task whose stored
result has the same model fingerprint, task checksum and instructions is reused instead of rerun.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from embedkit.datasets import find_data_dir
from embedkit.evaluation.mteb_model import EmbedkitEncoder, LoadedModel, from_embedder, load_instructions
from embedkit.evaluation.offline import ensure_offline, is_offline
from embedkit.evaluation.report import RUN_FILE, average, load_run, write_summary
from embedkit.evaluation.tasks import LocalTask, check_unique, find_tasks, read_task_rows, suggest, to_mteb_task
from embedkit.io import atomic_path, atomic_write_text, child_path, safe_name

logger = logging.getLogger(__name__)

DATALOADER_BATCH = 512  # only the size of the DataLoader batches mteb hands over; the model batches on its own


@dataclass
class EvalTask:
    """A task to run: a local folder or a standard mteb task, with what identifies its data."""

    name: str
    type: str
    metric: str
    source: str
    checksum: str
    mteb_task: object


def local_eval_task(task: LocalTask, data_dir: Path | None = None) -> EvalTask:
    """A local task folder made ready to run; every row is read and checked here, before any model loads."""
    read_task_rows(task)
    checksum = task.checksum()
    source = str(task.path)
    if data_dir is not None:
        try:
            source = "data:" + task.path.relative_to(Path(data_dir).resolve()).as_posix()
        except ValueError:
            pass
    return EvalTask(task.name, task.type, task.main_score, source, checksum, to_mteb_task(task, checksum))


def mteb_eval_tasks(names: Sequence[str], local_names: Sequence[str] = ()) -> list[EvalTask]:
    """Standard mteb tasks by name; unknown names fail with near matches, unreachable data with the fix."""
    import mteb  # noqa: PLC0415
    from mteb.get_tasks import TASK_LIST  # noqa: PLC0415  (task classes: names without building 1800 tasks)

    known = [cls.metadata.name for cls in TASK_LIST]
    out = []
    for name in names:
        if name not in known:
            near = suggest(name, sorted(set(known) | set(local_names)))
            hint = f" Near matches: {', '.join(near)}." if near else ""
            raise ValueError(f"No mteb task named {name!r}.{hint} Local task folders run with --task-dir.")
        task = mteb.get_task(name)
        meta = task.metadata
        try:
            task.load_data()
        except Exception as err:  # noqa: BLE001 - any failure here means the data cannot be had
            where = "the hub is off (HF_HUB_OFFLINE=1)" if is_offline() else "the download failed"
            local = [n for n in local_names if n.lower() == name.lower()]
            fix = (f"run the local copy with --task-dir (task '{local[0]}')" if local else
                   "make a local task folder in the ../shared/data layout and pass --task-dir, or set "
                   "HF_HUB_OFFLINE=0 where the hub is reachable")
            raise ValueError(f"mteb task {name!r} needs {meta.dataset['path']}@{meta.dataset['revision'][:12]} from "
                             f"the Hugging Face hub, and {where} and it is not in the local datasets cache "
                             f"({type(err).__name__}). Fix: {fix}.") from None
        simple = {"STS": "sts", "Retrieval": "retrieval", "Classification": "classification",
                  "Clustering": "clustering", "PairClassification": "pair_classification"}.get(meta.type, meta.type)
        out.append(EvalTask(name, simple, meta.main_score, f"mteb:{meta.dataset['path']}",
                            str(meta.dataset["revision"]), task))
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    out = {}
    for package in ("embedkit", "mteb", "torch", "transformers", "sentence-transformers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def _torch_threads() -> int | None:
    try:
        import torch  # noqa: PLC0415

        return torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a core dependency
        return None


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on every platform
        return None


def _reusable(previous: dict | None, model, instructions_digest: str | None) -> dict[str, dict]:
    """Tasks of a previous run in the same folder that can stand: same weights+settings and instructions."""
    if not previous or previous.get("model", {}).get("fingerprint") != model.fingerprint:
        return {}
    if previous.get("instructions", {}).get("digest") != instructions_digest:
        return {}
    return {t["name"]: t for t in previous.get("tasks", [])}


def _run_record(encoder, records: list[dict], load_seconds: float | None, digest: str | None) -> dict:
    model, table = encoder.model, encoder.instructions
    return {
        "model": {
            "label": model.label, "spec": model.spec, "backend": model.backend, "fingerprint": model.fingerprint,
            "mteb_name": encoder.mteb_model_meta.name, "dimension": model.dimension,
            "parameters": model.parameters, "config": model.config, "load_seconds": load_seconds,
            "runtime": {**model.runtime, "torch_threads": _torch_threads()},
        },
        "instructions": {"source": table.source if table is not None else None, "digest": digest,
                         "own": model.own_instructions},
        "tasks": records,
        "average": average([r["score"] for r in records]),
        "total_seconds": sum(r["seconds"] for r in records) + (load_seconds or 0.0),
        "total_cpu_seconds": (sum(r["cpu_seconds"] for r in records)
                              if all(r.get("cpu_seconds") is not None for r in records) else None),
        "date": datetime.datetime.now(tz=datetime.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
        "versions": _versions(),
    }


def result_path(output: Path, task_name: str) -> Path:
    """``OUTPUT/mteb/<task name>.json``; a task name is data, so it must be a plain file name (no '/', '..')."""
    return child_path(Path(output) / "mteb", safe_name(task_name, "task name") + ".json", "task result file")


def _run_task(encoder, task: EvalTask, path: Path) -> dict:
    """Evaluate one task with mteb's evaluator; its result JSON lands atomically at ``path``."""
    import mteb  # noqa: PLC0415
    from mteb.results import TaskResult  # noqa: PLC0415

    start, cpu_start = time.perf_counter(), time.process_time()
    result = mteb.evaluate(encoder, task.mteb_task, cache=None, overwrite_strategy="always",
                           show_progress_bar=False, raise_error=True,
                           encode_kwargs={"batch_size": DATALOADER_BATCH, "show_progress_bar": False})
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    task_result: TaskResult = result.task_results[0]
    with atomic_path(path) as tmp:
        task_result.to_disk(tmp)
    return {
        "name": task.name, "type": task.type, "metric": task.metric, "score": float(task_result.get_score()),
        "seconds": seconds, "cpu_seconds": cpu_seconds, "evaluation_time": task_result.evaluation_time,
        "source": task.source, "checksum": task.checksum, "result_file": f"mteb/{path.name}",
        "instructions": encoder.used_instructions.get(task.name, {}), "reused": False,
        "load_average": _load_average(),  # 1-min load at the end: context for wall times on shared CPUs
    }


def evaluate(encoder, tasks: Sequence[EvalTask], output: str | os.PathLike, *, load_seconds: float | None = None,
             reuse: bool = True, on_task: Callable[[dict], None] | None = None) -> dict:
    """Run every task with mteb's evaluator, write results into ``output``; returns the run record."""
    ensure_offline()
    import datasets  # noqa: PLC0415

    if not logger.isEnabledFor(logging.INFO):
        datasets.disable_progress_bars()  # mteb's dataset.map bars would bury the per-task lines

    check_unique(t.name for t in tasks)
    if not tasks:
        raise ValueError("No tasks to evaluate.")
    output = Path(output)
    model = encoder.model
    table = encoder.instructions
    digest = table.digest() if table is not None else None
    previous = None
    if reuse and (output / RUN_FILE).is_file():
        try:
            previous = load_run(output)
        except ValueError:
            previous = None
    old = _reusable(previous, model, digest)
    if previous and previous.get("model", {}).get("fingerprint") != model.fingerprint:
        logger.warning("%s held results of another model (%s, fingerprint %s); they are replaced.", output,
                       previous["model"].get("label"), previous["model"].get("fingerprint"))
    result_paths = [result_path(output, task.name) for task in tasks]  # every name checked before any work
    atomic_write_text(output / "mteb" / "model_meta.json",
                      json.dumps(encoder.mteb_model_meta.to_dict(), indent=2, default=str))
    records: list[dict] = []
    run: dict = {}
    for task, path in zip(tasks, result_paths, strict=True):
        prior = old.get(task.name)
        if prior and prior.get("checksum") == task.checksum and path.is_file():
            record = dict(prior, reused=True)
        else:
            record = _run_task(encoder, task, path)
        records.append(record)
        # run.json after every task: an interrupted run keeps what it finished, and a rerun picks it up
        run = _run_record(encoder, records, load_seconds, digest)
        atomic_write_text(output / RUN_FILE, json.dumps(run, indent=2))
        if on_task is not None:
            on_task(record)
    write_summary(run, output)
    return run


def evaluate_model(model, task_dirs: Sequence[str | os.PathLike], output: str | os.PathLike, *,
                   instructions=None, label: str | None = None, batch_size: int | None = None,
                   reuse: bool = True) -> dict:
    """Python entry point: evaluate an Embedder (or a LoadedModel) on task folders; returns the run record.

    ``instructions`` is an InstructionTable, a path to one, "default" (the shipped table), or None (the model's
    own instructions).
    """
    loaded = model if isinstance(model, LoadedModel) else from_embedder(model, label=label)
    instructions = load_instructions(instructions)
    try:
        data_dir = find_data_dir()
    except FileNotFoundError:
        data_dir = None
    tasks = [local_eval_task(t, data_dir) for t in find_tasks(task_dirs)]
    return evaluate(EmbedkitEncoder(loaded, instructions, batch_size=batch_size), tasks, output, reuse=reuse)
