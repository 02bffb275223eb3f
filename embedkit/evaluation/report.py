"""Result tables (markdown, CSV), bar charts and cross-run comparison from ``run.json`` files.

A run folder holds ``run.json`` (written by the harness) plus mteb's per-task JSON under ``mteb/``; everything
here reads ``run.json`` only, so tables can be rebuilt without a model.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from embedkit.io import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"


def pct(score: float | None) -> str:
    return "–" if score is None else f"{100 * score:.2f}"


def secs(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.0f}" if seconds >= 100 else f"{seconds:.1f}"


def average(scores: Sequence[float]) -> float | None:
    return sum(scores) / len(scores) if scores else None


# -- one run --------------------------------------------------------------------------------------------------
def summary_markdown(run: dict) -> str:
    """The per-run table: main score per task, the average, and time per task."""
    model = run["model"]
    lines = [
        f"# {model['label']}",
        "",
        f"- model: `{model['spec']}` ({model['backend']}), fingerprint `{model['fingerprint']}`, "
        f"{model['parameters']:,} parameters, dimension {model['dimension']}",
        f"- instructions: {run.get('instructions', {}).get('source') or 'model defaults'}",
        f"- mteb {run['versions'].get('mteb')}, embedkit {run['versions'].get('embedkit')}, {run['date']}",
        f"- total time {secs(run['total_seconds'])} s (model load {secs(model.get('load_seconds'))} s); "
        f"CPU time of the tasks {secs(run.get('total_cpu_seconds'))} s",
        "",
        "| task | type | metric | score | time (s) | CPU (s) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for t in run["tasks"]:
        lines.append(f"| {t['name']} | {t['type']} | {t['metric']} | {pct(t['score'])} | {secs(t['seconds'])} | "
                     f"{secs(t.get('cpu_seconds'))} |")
    lines.append(f"| **average** | | | **{pct(run.get('average'))}** | {secs(run['total_seconds'])} | "
                 f"{secs(run.get('total_cpu_seconds'))} |")
    return "\n".join(lines) + "\n"


def summary_csv(run: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["task", "type", "metric", "score", "seconds", "source", "checksum"])
    for t in run["tasks"]:
        writer.writerow([t["name"], t["type"], t["metric"], f"{100 * t['score']:.4f}", f"{t['seconds']:.2f}",
                         t["source"], t["checksum"]])
    writer.writerow(["average", "", "", "" if run.get("average") is None else f"{100 * run['average']:.4f}",
                     f"{run['total_seconds']:.2f}", "", ""])
    return out.getvalue()


def bar_chart(labels: Sequence[str], series: dict[str, Sequence[float | None]], path: str | os.PathLike,
              title: str) -> Path | None:
    """Grouped horizontal bars (score x 100) per task; one colour per series. Skipped without matplotlib."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        logger.warning("matplotlib is not installed: no chart written (pip install matplotlib).")
        return None
    n_series = max(1, len(series))
    height = 0.8 / n_series
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.35 * len(labels) * max(1, n_series * 0.6)))
    for k, (name, values) in enumerate(series.items()):
        ys = [i + (k - (n_series - 1) / 2) * height for i in range(len(labels))]
        xs = [0 if v is None else 100 * v for v in values]
        bars = ax.barh(ys, xs, height=height * 0.95, label=name)
        for bar, value in zip(bars, values, strict=True):
            ax.text(bar.get_width() + 0.5, bar.get_y() + bar.get_height() / 2,
                    "–" if value is None else f"{100 * value:.1f}", va="center", fontsize=7)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel("main score x 100")
    ax.set_title(title)
    if n_series > 1:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def write_summary(run: dict, folder: str | os.PathLike) -> None:
    """summary.md, summary.csv and scores.png beside run.json."""
    folder = Path(folder)
    atomic_write_text(Path(folder) / "summary.md", summary_markdown(run))
    atomic_write_text(Path(folder) / "summary.csv", summary_csv(run))
    labels = [t["name"] for t in run["tasks"]] + ["average"]
    bar_chart(labels, {run["model"]["label"]: [t["score"] for t in run["tasks"]] + [run.get("average")]},
              folder / "scores.png", f"{run['model']['label']} (main score per task)")


# -- several runs ----------------------------------------------------------------------------------------------
def load_run(folder: str | os.PathLike) -> dict:
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an evaluation results folder (no {RUN_FILE}); make one with "
                                "`embedkit eval MODEL --task-dir ... --output DIR`.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from None


def expand_run_dirs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Run folders, where a folder without run.json stands for its sub-folders that have one."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if (path / RUN_FILE).is_file():
            out.append(path)
        elif path.is_dir() and (subs := sorted(p.parent for p in path.glob(f"*/{RUN_FILE}"))):
            out += subs
        else:
            load_run(path)  # raises the clear error
    return out


@dataclass
class Comparison:
    """Scores and times of several runs over the union of their tasks."""

    runs: list[dict]
    tasks: list[str]  # union, in first-seen order
    common: list[str]  # tasks every run has: the average is over these
    notes: list[str]

    def cell(self, run: dict, task: str, key: str = "score") -> float | None:
        for t in run["tasks"]:
            if t["name"] == task:
                return t.get(key)
        return None

    def average(self, run: dict) -> float | None:
        return average([self.cell(run, t) for t in self.common])


def compare_runs(folders: Sequence[str | os.PathLike]) -> Comparison:
    runs = [load_run(f) for f in expand_run_dirs(folders)]
    if not runs:
        raise ValueError("No runs to compare.")
    tasks: list[str] = []
    for run in runs:
        tasks += [t["name"] for t in run["tasks"] if t["name"] not in tasks]
    common = [t for t in tasks if all(any(x["name"] == t for x in r["tasks"]) for r in runs)]
    notes = []
    for task in tasks:
        sums = {x["checksum"] for r in runs for x in r["tasks"] if x["name"] == task}
        if len(sums) > 1:
            notes.append(f"{task}: runs used different data (checksums {', '.join(sorted(s[:12] for s in sums))}); "
                         "its scores are not comparable.")
    if len(common) < len(tasks):
        notes.append(f"average over the {len(common)} task(s) every run has: {', '.join(common) or 'none'}.")
    return Comparison(runs, tasks, common, notes)


def comparison_markdown(cmp: Comparison, title: str | None = None, times: bool = True) -> str:
    """Score table (runs x tasks + average) and, with ``times``, the seconds per task."""
    lines = [f"# {title}", ""] if title else []
    lines += ["| model | " + " | ".join(cmp.tasks) + " | **avg** |",
              "|---|" + "---:|" * (len(cmp.tasks) + 1)]
    for run in cmp.runs:
        cells = [pct(cmp.cell(run, t)) for t in cmp.tasks]
        lines.append(f"| {run['model']['label']} | " + " | ".join(cells) + f" | **{pct(cmp.average(run))}** |")
    if times:
        lines += ["", "Run time per task (wall seconds, including data loading; model load separate; CPU total = "
                  "process CPU seconds of the tasks, all threads):", "",
                  "| model | " + " | ".join(cmp.tasks) + " | model load | total | CPU total |",
                  "|---|" + "---:|" * (len(cmp.tasks) + 3)]
        for run in cmp.runs:
            cells = [secs(cmp.cell(run, t, "seconds")) for t in cmp.tasks]
            lines.append(f"| {run['model']['label']} | " + " | ".join(cells)
                         + f" | {secs(run['model'].get('load_seconds'))} | {secs(run['total_seconds'])} | "
                         f"{secs(run.get('total_cpu_seconds'))} |")
    if cmp.notes:
        lines += [""] + [f"Note: {n}" for n in cmp.notes]
    return "\n".join(lines) + "\n"


def comparison_csv(cmp: Comparison) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["model", "fingerprint", *cmp.tasks, "average", "total_seconds"])
    for run in cmp.runs:
        scores = [cmp.cell(run, t) for t in cmp.tasks]
        avg = cmp.average(run)
        writer.writerow([run["model"]["label"], run["model"]["fingerprint"],
                         *["" if s is None else f"{100 * s:.4f}" for s in scores],
                         "" if avg is None else f"{100 * avg:.4f}", f"{run['total_seconds']:.2f}"])
    return out.getvalue()


def comparison_plot(cmp: Comparison, path: str | os.PathLike) -> Path | None:
    labels = [*cmp.tasks, "average"]
    series = {run["model"]["label"]: [cmp.cell(run, t) for t in cmp.tasks] + [cmp.average(run)]
              for run in cmp.runs}
    return bar_chart(labels, series, path, "main score per task")


def comparison_details(cmp: Comparison) -> str:
    """Provenance lines for a results page: each run's model, fingerprint, settings; each task's checksum."""
    lines = ["| model | spec | backend | fingerprint | settings | instructions |", "|---|---|---|---|---|---|"]
    for run in cmp.runs:
        m = run["model"]
        cfg = m.get("config", {})
        settings = ", ".join(f"{k}={cfg[k]}" for k in ("attention", "pooling", "max_length", "dtype") if k in cfg)
        if cfg.get("template"):
            settings += f", template={cfg['template']!r}"
        if "max_seq_length" in cfg:
            settings = f"max_seq_length={cfg['max_seq_length']}"
        lines.append(f"| {m['label']} | `{m['spec']}` | {m['backend']} | `{m['fingerprint']}` | {settings} | "
                     f"{run.get('instructions', {}).get('source') or 'model defaults'} |")
    lines += ["", "| task | type | metric | source | checksum (sha256) |", "|---|---|---|---|---|"]
    seen = set()
    for run in cmp.runs:
        for t in run["tasks"]:
            if t["name"] not in seen:
                seen.add(t["name"])
                lines.append(f"| {t['name']} | {t['type']} | {t['metric']} | `{t['source']}` | "
                             f"`{t['checksum'][:16]}` |")
    return "\n".join(lines) + "\n"
