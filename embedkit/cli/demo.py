"""The main job end to end on the embedded default (``embedkit demo``): baselines -> train a recipe -> STS-B
before/after -> encode and index a retrieval corpus -> search -> MTEB evaluation. ``make demo`` runs it on
SmolLM2-135M. It uses train, corpus, index and evaluation, so it lives in the top layer, beside its command.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

import typer

from embedkit.backbone import load_backbone
from embedkit.cli.common import run_cli
from embedkit.datasets import find_data_dir
from embedkit.embedder import CONFIG_FILE, Embedder
from embedkit.evaluation.harness import evaluate_model
from embedkit.evaluation.mteb_model import PROMPT_EOL
from embedkit.evaluation.retrieval import evaluate_retrieval
from embedkit.evaluation.sts import sts_spearman
from embedkit.evaluation.tasks import read_task, read_task_rows
from embedkit.index import Index
from embedkit.train import load_recipe, run_recipe
from embedkit.train.trainer import check_data

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RECIPE = ROOT / "recipes" / "llm2vec-smollm2-cpu.yaml"
BASELINE_SETUPS = [  # attention, pooling, template
    ("causal", "mean", None),
    ("causal", "last", None),
    ("bidirectional", "mean", None),
    ("causal", "last", PROMPT_EOL),
]
RETRIEVAL_TASK = Path("retrieval") / "MSMARCO-5k"
STS_TASK = Path("sts") / "STSBenchmark"


def setup_name(attention: str, pooling: str, template: str | None) -> str:
    return f"{attention} + {pooling}" + (" + PromptEOL" if template else "")


def baselines(model: str, data_dir: Path, echo: Callable[[str], None], dtype: str = "auto",
              max_length: int = 128) -> dict[str, float]:
    """STS-B test Spearman of each untrained attention/pooling setup, sharing one loaded backbone."""

    backbone, tokenizer = load_backbone(model, dtype=dtype)
    scores = {}
    for attention, pooling, template in BASELINE_SETUPS:
        embedder = Embedder.from_pretrained(model, attention=attention, pooling=pooling, max_length=max_length,
                                            template=template, backbone=backbone, tokenizer=tokenizer)
        start = time.perf_counter()
        name = setup_name(attention, pooling, template)
        scores[name] = sts_spearman(embedder, data_dir)
        echo(f"  {name:<32} STS-B test Spearman {100 * scores[name]:5.1f}   ({time.perf_counter() - start:.1f} s)")
    embedder.set_attention("causal")
    return scores


def check_demo_inputs(spec, data_dir: Path, train: bool) -> None:
    """Everything the demo will read, checked before the first model loads: the STS-B and MSMARCO-5k task
    folders (every row) and the recipe's training data (or, without training, the saved embedder). Otherwise a
    missing file is found only after minutes of baselines or training."""

    problems = []
    for folder in (data_dir / STS_TASK, data_dir / RETRIEVAL_TASK):
        try:
            read_task_rows(read_task(folder))
        except (ValueError, OSError) as err:
            problems.append(str(err).strip())
    if train:
        try:
            check_data(spec)
        except ValueError as err:
            problems.append(" ".join(str(err).split()))
    elif not (Path(spec.output_dir) / "final" / CONFIG_FILE).is_file():
        problems.append(f"--no-train needs a trained embedder in {Path(spec.output_dir) / 'final'}; train first.")
    if problems:
        raise ValueError("The demo cannot run (nothing was loaded yet): " + " | ".join(problems))


def run_demo(data: str | os.PathLike | None = None, recipe: str | os.PathLike = DEFAULT_RECIPE,
             overrides: Sequence[str] = (), *, train: bool = True, with_baselines: bool = True,
             echo: Callable[[str], None] = print) -> dict:
    """Run every stage of the main job and return its figures (also echoed as it goes)."""

    data_dir = find_data_dir(data)
    overrides = [f"data_dir={data_dir}", *overrides]
    spec = load_recipe(recipe, overrides)
    out = Path(spec.output_dir)
    check_demo_inputs(spec, data_dir, train)
    figures: dict = {"recipe": str(recipe), "data": str(data_dir)}
    echo(f"[1/5] untrained {spec.model.base}: STS-B test (data {data_dir})")
    figures["baselines"] = baselines(spec.model.base, data_dir, echo) if with_baselines else {}

    before = Embedder.from_pretrained(spec.model.base, attention=spec.model.attention, pooling=spec.model.pooling,
                                      template=spec.model.template, max_length=128)
    figures["before"] = sts_spearman(before, data_dir)
    del before
    if train:
        echo(f"[2/5] training {recipe} ({len(spec.stages)} stages: "
             + " -> ".join(s.objective for s in spec.stages) + f") into {out}")
        start = time.perf_counter()
        final = run_recipe(recipe, overrides)
        figures["train_seconds"] = time.perf_counter() - start
    else:
        final = out / "final"
        echo(f"[2/5] training skipped; using {final}")
    trained = Embedder.load(final)
    trained.config.max_length = 128
    figures["after"] = sts_spearman(trained, data_dir)
    figures["model"] = str(final)
    echo(f"[3/5] STS-B test Spearman: before {100 * figures['before']:.1f} "
         f"({setup_name(spec.model.attention, spec.model.pooling, spec.model.template)}) -> after training "
         f"{100 * figures['after']:.1f}")

    task = data_dir / RETRIEVAL_TASK
    echo(f"[4/5] encode + FAISS index + search: {task.name}")
    retrieval = evaluate_retrieval(trained, task, work_dir=out / "demo-retrieval")
    figures["retrieval"] = {k: retrieval[k] for k in ("ndcg_at_10", "recall_at_100")}
    echo(f"  nDCG@10 {100 * retrieval['ndcg_at_10']:.1f}, recall@100 {100 * retrieval['recall_at_100']:.1f}")
    index = Index.load(out / "demo-retrieval" / "index", embedder=trained)
    query = "what is the capital of france"
    hit = index.search([query], k=1)[0][0]
    echo(f"  search {query!r} -> {hit.id} ({hit.score:.3f})")

    echo("[5/5] MTEB evaluation (mteb's own evaluator) on STS-B")
    run = evaluate_model(trained, [data_dir / STS_TASK], out / "demo-eval")
    figures["mteb"] = {t["name"]: t["score"] for t in run["tasks"]}
    for name, score in figures["mteb"].items():
        echo(f"  {name}: main score {100 * score:.2f}")
    echo(f"saved embedder: {final}  (Embedder.load or SentenceTransformer)")
    return figures


def demo(data: Annotated[str, typer.Option(help="Data folder (default ../shared/data).")] = None,
         recipe: Annotated[str, typer.Option(help="Training recipe.")] = None,
         overrides: Annotated[list[str], typer.Option("--set", help="Recipe override key.sub=value.")] = None,
         train: Annotated[bool, typer.Option(help="Train (or reuse the recipe's output folder).")] = True) -> None:
    """The main job end to end: baselines, train the CPU recipe, STS-B before/after, encode+index+search, MTEB."""
    run_cli(run_demo, data, recipe or DEFAULT_RECIPE, overrides or (), train=train, echo=typer.echo)
