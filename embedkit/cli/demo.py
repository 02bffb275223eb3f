"""The main job end to end on the embedded default (``embedkit demo``): baselines -> train a recipe -> STS-B
before/after through MTEB's evaluator -> encode and index a retrieval corpus -> search. ``make demo`` runs it on
Gemma 3 270M with the best recipe that fits its budget. It uses train, corpus, index and evaluation, so it lives
in the top layer, beside its command.

Every model forward it makes is one it reports: the untrained figure of the recipe's own setup is taken from the
baselines, the recipe's per-stage STS-B scoring is switched off (the demo scores the final model once, with MTEB),
and retrieval runs on a fixed 1,000-passage sample of MSMARCO-5k. That keeps the demo within 25 minutes on a
2-core CPU without native bf16 (float32), where a forward pass costs 3-6x more (docs: README, "Set up and run").
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
DEFAULT_RECIPE = ROOT / "recipes" / "distill-gemma3-270m-demo.yaml"
BASELINE_SETUPS = [  # attention, pooling, template (causal + last without a template, 31.6: BASELINES.md)
    ("causal", "mean", None),
    ("bidirectional", "mean", None),
    ("causal", "last", PROMPT_EOL),
]
BASELINE_MAX_LENGTH = 128  # as BASELINES.md measures
RETRIEVAL_TASK = Path("retrieval") / "MSMARCO-5k"
RETRIEVAL_DOCUMENTS = 1000
STS_TASK = Path("sts") / "STSBenchmark"


def setup_name(attention: str, pooling: str, template: str | None) -> str:
    return f"{attention} + {pooling}" + (" + PromptEOL" if template else "")


def baselines(model: str, data_dir: Path, echo: Callable[[str], None], dtype: str = "auto",
              max_length: int = BASELINE_MAX_LENGTH) -> dict[str, float]:
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
             retrieval_documents: int | None = RETRIEVAL_DOCUMENTS, echo: Callable[[str], None] = print) -> dict:
    """Run every stage of the main job and return its figures (also echoed as it goes)."""

    data_dir = find_data_dir(data)
    overrides = [f"data_dir={data_dir}", "evaluate.sts_splits=[]", *overrides]
    spec = load_recipe(recipe, overrides)
    out = Path(spec.output_dir)
    check_demo_inputs(spec, data_dir, train)
    figures: dict = {"recipe": str(recipe), "data": str(data_dir)}
    echo(f"[1/4] untrained {spec.model.base}: STS-B test (data {data_dir})")
    figures["baselines"] = baselines(spec.model.base, data_dir, echo) if with_baselines else {}
    setup = setup_name(spec.model.attention, spec.model.pooling, spec.model.template)
    figures["before"] = figures["baselines"].get(setup)
    if figures["before"] is None:  # the recipe starts from a setup the baselines did not score
        before = Embedder.from_pretrained(spec.model.base, attention=spec.model.attention,
                                          pooling=spec.model.pooling, template=spec.model.template,
                                          max_length=BASELINE_MAX_LENGTH)
        figures["before"] = sts_spearman(before, data_dir)
        del before
    if train:
        echo(f"[2/4] training {recipe} ({len(spec.stages)} stages: "
             + " -> ".join(s.objective for s in spec.stages) + f") into {out}")
        start = time.perf_counter()
        final = run_recipe(recipe, overrides)
        figures["train_seconds"] = time.perf_counter() - start
    else:
        final = out / "final"
        echo(f"[2/4] training skipped; using {final}")
    trained = Embedder.load(final)
    trained.config.max_length = BASELINE_MAX_LENGTH
    figures["model"] = str(final)

    echo("[3/4] STS-B test through MTEB (mteb's own evaluator)")
    run = evaluate_model(trained, [data_dir / STS_TASK], out / "demo-eval")
    figures["mteb"] = {t["name"]: t["score"] for t in run["tasks"]}
    figures["after"] = figures["mteb"]["STSBenchmark"]
    echo(f"  STS-B test Spearman: before {100 * figures['before']:.1f} ({setup}) -> after training "
         f"{100 * figures['after']:.2f}")

    task = data_dir / RETRIEVAL_TASK
    sample = f"a fixed sample of {retrieval_documents} passages" if retrieval_documents else "every passage"
    echo(f"[4/4] encode + FAISS index + search: {task.name}, {sample}")
    retrieval = evaluate_retrieval(trained, task, work_dir=out / "demo-retrieval",
                                   max_documents=retrieval_documents or None)
    figures["retrieval"] = {k: retrieval[k] for k in ("ndcg_at_10", "recall_at_100", "n_documents", "n_queries")}
    echo(f"  {retrieval['n_documents']} passages, {retrieval['n_queries']} queries: "
         f"nDCG@10 {100 * retrieval['ndcg_at_10']:.1f}, recall@100 {100 * retrieval['recall_at_100']:.1f}")
    index = Index.load(retrieval["index_dir"], embedder=trained)
    query = "what is the capital of france"
    hit = index.search([query], k=1)[0][0]
    echo(f"  search {query!r} -> {hit.id} ({hit.score:.3f})")
    echo(f"saved embedder: {final}  (embedkit.Embedder.load); serve it with search over that index: "
         f"embedkit serve {final} --index {retrieval['index_dir']}")
    return figures


def demo(data: Annotated[str, typer.Option(help="Data folder (default ../shared/data).")] = None,
         recipe: Annotated[str, typer.Option(help="Training recipe.")] = None,
         overrides: Annotated[list[str], typer.Option("--set", help="Recipe override key.sub=value.")] = None,
         train: Annotated[bool, typer.Option(help="Train (or reuse the recipe's output folder).")] = True,
         retrieval_documents: Annotated[int, typer.Option(
             min=0, help="MSMARCO-5k passages to encode and search (a fixed sample); 0 = all 5,000.")]
         = RETRIEVAL_DOCUMENTS) -> None:
    """The main job end to end: baselines, train the CPU recipe, STS-B before/after (MTEB), encode+index+search."""
    run_cli(run_demo, data, recipe or DEFAULT_RECIPE, overrides or (), train=train,
            retrieval_documents=retrieval_documents, echo=typer.echo)
