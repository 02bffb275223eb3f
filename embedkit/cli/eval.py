"""MTEB evaluation on local task folders (run), and one table across runs (compare).

'embedkit eval MODEL ...' is short for 'embedkit eval run MODEL ...'.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Annotated

import torch
import typer
from typer.core import TyperGroup

from embedkit.cli.common import first_line, run_cli
from embedkit.datasets import find_data_dir
from embedkit.evaluation.harness import EvalTask, evaluate, local_eval_task, mteb_eval_tasks
from embedkit.evaluation.mteb_model import EmbedkitEncoder, LoadedModel, load_instructions, open_eval_model
from embedkit.evaluation.offline import ensure_offline
from embedkit.evaluation.report import (
    compare_runs,
    comparison_csv,
    comparison_details,
    comparison_markdown,
    comparison_plot,
    pct,
    secs,
)
from embedkit.evaluation.task_sets import read_task_set
from embedkit.evaluation.tasks import find_tasks
from embedkit.io import atomic_write_text


class _RunByDefault(TyperGroup):
    """Lets ``embedkit eval MODEL`` mean ``embedkit eval run MODEL`` (any first word that is no sub-command)."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(cls=_RunByDefault, add_completion=False, no_args_is_help=True, help=__doc__)

TEMPLATE_HELP = "Text template with {text}, or 'prompteol' (PromptEOL; use with --pooling last)."


def baselines_dir(explicit: Path | None) -> Path | None:
    """Stored baseline results to compare with: ``--baselines``, else ``eval/results`` of the current folder or
    of the source checkout this package runs from (an installed wheel has none: then no hint is printed)."""
    if explicit is not None:
        return explicit
    checkout = Path(__file__).resolve().parents[2]
    for root in (Path.cwd(), checkout):
        if (root / "eval" / "results").is_dir() and (root / "pyproject.toml").is_file():
            return root / "eval" / "results"
    return None


@eval_app.command("run")
# typer reads each option's declaration from the signature: 20 options make this function long, its body is short
def run(
    model: Annotated[str, typer.Argument(help="Saved embedder folder, backbone spec (hub id, folder, .gguf, alias), "
                                              "or all-MiniLM-L6-v2.")],
    task_dir: Annotated[list[Path], typer.Option(help="Task folder, or a folder of task folders (repeatable).")]
    = None,
    task_set: Annotated[str, typer.Option(help="Shipped task set name (full, quick) or a file listing task "
                                               "folders relative to --data.")] = None,
    tasks: Annotated[str, typer.Option(help="Standard mteb task names, comma-separated (needs their data).")]
    = None,
    data: Annotated[str, typer.Option(help="Data folder for --task-set (default ../shared/data).")] = None,
    output: Annotated[Path, typer.Option(help="Results folder (default runs/eval/<name>).")] = None,
    name: Annotated[str, typer.Option(help="Run name shown in tables (default from the model).")] = None,
    attention: Annotated[str, typer.Option(help="causal or bidirectional (backbone specs; saved: override).")]
    = None,
    pooling: Annotated[str, typer.Option(help="Pooling for backbone specs (mean, last, eos, ...).")] = None,
    template: Annotated[str, typer.Option(help=TEMPLATE_HELP)] = None,
    max_length: Annotated[int, typer.Option(help="Max tokens per text.")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16.")] = "auto",
    instructions: Annotated[str, typer.Option(help="Per-task instruction table: none (model defaults), "
                                                   "default (the shipped table), or a JSON file.")] = "none",
    batch_size: Annotated[int, typer.Option(help="Max texts per forward pass (default: the model's own).")]
    = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads (1 is often fastest on a busy shared machine).")]
    = None,
    compile_layers: Annotated[bool, typer.Option("--compile", help="torch.compile the decoder layers (embedkit "
                                                 "models): ~1 min to compile, then faster encoding.")] = False,
    rerun: Annotated[bool, typer.Option("--rerun", help="Rerun tasks even if stored results match.")] = False,
    baselines: Annotated[Path, typer.Option(help="Folder of baseline results the run is shown beside (default: "
                                                 "eval/results of the source checkout, when there is one).")]
    = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Evaluate MODEL on local task folders (and/or standard mteb tasks) with mteb's evaluators."""
    def body():
        ensure_offline()
        eval_tasks = collect_tasks(task_dir, task_set, tasks, data)
        typer.echo(f"{len(eval_tasks)} task(s): {', '.join(t.name for t in eval_tasks)}")
        table = load_instructions(instructions)
        if threads:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        loaded = open_model_for_eval(model, debug=debug, compile_layers=compile_layers, attention=attention,
                                     pooling=pooling, dtype=dtype, max_length=max_length, template=template,
                                     label=name)
        load_seconds = time.perf_counter() - start
        typer.echo(f"model {loaded.label} ({loaded.backend}, fingerprint {loaded.fingerprint}, "
                   f"loaded in {load_seconds:.1f} s)")
        out = output or Path("runs") / "eval" / loaded.label
        run_record = evaluate(EmbedkitEncoder(loaded, table, batch_size=batch_size), eval_tasks, out,
                              load_seconds=load_seconds, reuse=not rerun, on_task=show_task)
        show_run(run_record, out, baselines)

    if not debug:
        logging.getLogger("mteb").setLevel(logging.ERROR)
        # mteb's scoring (sklearn) warns per label and experiment for weak models; the scores stand as computed
        warnings.filterwarnings("ignore", module=r"sklearn\.")
    run_cli(body, debug=debug)


def collect_tasks(task_dir: list[Path] | None, task_set: str | None, tasks: str | None,
                  data: str | None) -> list[EvalTask]:
    """The tasks ``eval run`` names: local task folders, a task set's folders, then standard mteb tasks."""
    if not (task_dir or task_set or tasks):
        raise ValueError("Nothing to evaluate: give --task-dir DIR, --task-set NAME or --tasks NAME,... "
                         "(e.g. --task-dir ../shared/data for every local task).")
    try:
        data_dir = find_data_dir(data)
    except FileNotFoundError:
        if task_set or data:
            raise
        data_dir = None
    folders = list(task_dir or [])
    if task_set:
        folders += read_task_set(task_set, data_dir)
    local = find_tasks(folders) if folders else []
    eval_tasks = [local_eval_task(t, data_dir) for t in local]
    if tasks:
        local_names = [t.name for t in local]
        if data_dir is not None:
            local_names += [p.parent.name for p in Path(data_dir).glob("*/*/task.json")]
        eval_tasks += mteb_eval_tasks([n.strip() for n in tasks.split(",") if n.strip()], local_names)
    return eval_tasks


def open_model_for_eval(model: str, *, debug: bool, compile_layers: bool, **options) -> LoadedModel:
    """``open_eval_model`` whose load error names the model (one line unless --debug), then ``--compile``."""
    try:
        loaded = open_eval_model(model, **options)
    except Exception as err:
        if debug:
            raise
        raise ValueError(f"could not load model {model!r}: {first_line(err)}") from None
    if compile_layers:
        if loaded.backend != "embedkit":
            raise ValueError("--compile applies to embedkit models; drop it for sentence-transformers models.")
        loaded.model.compile_layers()
        loaded.runtime["compiled"] = True
    return loaded


def show_task(record: dict) -> None:
    """One table row per finished task."""
    note = " (stored result reused)" if record.get("reused") else ""
    typer.echo(f"  {record['name']:<24} {record['type']:<20} {record['metric']:<16} "
               f"{pct(record['score']):>6}  {secs(record['seconds']):>6} s{note}")


def show_run(run_record: dict, out: Path, baselines: Path | None) -> None:
    """The average row, where the results are, and how to see them beside the stored baselines."""
    typer.echo(f"  {'average':<58} {pct(run_record['average']):>6}  {secs(run_record['total_seconds']):>6} s")
    typer.echo(f"results in {out}/ (run.json, summary.md, summary.csv, scores.png, mteb/*.json)")
    stored = baselines_dir(baselines)
    if stored is not None and any(stored.glob("*/run.json")) and Path(out).resolve().parent != stored.resolve():
        typer.echo(f"beside the baselines: embedkit eval compare {stored} {out}")


@eval_app.command("compare")
def compare(
    results: Annotated[list[Path], typer.Argument(help="Results folders (or folders of them).")],
    markdown: Annotated[Path, typer.Option(help="Also write the tables as a markdown page.")] = None,
    csv_out: Annotated[Path, typer.Option("--csv", help="Also write the score table as CSV.")] = None,
    plot: Annotated[Path, typer.Option(help="Also write a grouped bar chart PNG.")] = None,
    title: Annotated[str, typer.Option(help="Title of the markdown page.")] = "Evaluation results",
    preamble: Annotated[Path, typer.Option(help="Markdown file placed under the title of the page.")] = None,
    times: Annotated[bool, typer.Option(help="Include the run-time table.")] = True,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """One table of main scores (x100) across runs: rows are runs, columns tasks, plus the average."""
    def body():
        cmp = compare_runs(results)
        typer.echo(comparison_markdown(cmp, times=times), nl=False)
        if markdown:
            intro = preamble.read_text(encoding="utf-8").strip() + "\n\n" if preamble else ""
            page = (f"# {title}\n\n{intro}" + comparison_markdown(cmp, times=times)
                    + "\n## Runs and data\n\n" + comparison_details(cmp))
            atomic_write_text(markdown, page)
        if csv_out:
            atomic_write_text(csv_out, comparison_csv(cmp))
        if plot:
            comparison_plot(cmp, plot)

    run_cli(body, debug=debug)
