"""Shared by the training tests and the subprocesses they start (tiny recipes on stories260K)."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

from embedkit.datasets import find_data_dir
from embedkit.train import register_attention_schedule

TINY_MODEL = str(Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K")
if not Path(TINY_MODEL).is_dir():
    TINY_MODEL = "/work/shared/models/stories260K"


@register_attention_schedule("test_probe")
def probe_schedule(settings: dict, stage_config, total_steps: int):
    """Records each call; kills the process (SIGKILL, as kill -9) at step ``$EMBEDKIT_TEST_KILL_AT``."""
    calls = settings.setdefault("_calls", []) if settings.get("record") else None

    def apply(step: int, embedder) -> None:
        if os.environ.get("EMBEDKIT_TEST_KILL_AT") == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        embedder.attention_bias = None
        if calls is not None:
            calls.append((step, total_steps, type(embedder).__name__))
    return apply


def write_data(folder: Path) -> tuple[Path, Path]:
    """64 TinyStories sentences and 32 SNLI triplets (with two sources) copied into ``folder``."""
    data = find_data_dir()
    folder.mkdir(parents=True, exist_ok=True)
    lines = (data / "unlabeled" / "TinyStories" / "sentences.txt").read_text().splitlines()[:64]
    texts = folder / "texts.txt"
    texts.write_text("\n".join(lines) + "\n")
    rows = (data / "triplets" / "SNLI" / "train.jsonl").read_text().splitlines()[:32]
    triplets = folder / "triplets.jsonl"
    out = []
    for i, line in enumerate(rows):
        row = json.loads(line)
        row["source"] = "a" if i % 2 else "b"
        out.append(json.dumps(row))
    triplets.write_text("\n".join(out) + "\n")
    return texts, triplets


def tiny_recipe(folder: Path, output: Path, **extra) -> dict:
    texts, triplets = write_data(folder)
    recipe = {
        "model": {"base": TINY_MODEL, "dtype": "float32", "attention": "bidirectional", "pooling": "mean",
                  "max_length": 24},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "output_dir": str(output),
        "seed": 7,
        "threads": 1,
        "checkpoint": {"every": 1, "keep": 2},
        "logging": {"every": 1, "progress_bar": False},
        "stages": [
            {"objective": "mntp", "data": {"paths": [str(texts)]}, "steps": 3, "batch_size": 4,
             "mask_token": "new", "optimizer": {"lr": 1e-3}},
            {"objective": "simcse", "data": {"paths": [str(texts)]}, "steps": 4, "batch_size": 8,
             "mini_batch_size": 4, "attention_dropout": 0.1, "optimizer": {"lr": 1e-3},
             "attention_schedule": {"name": "test_probe"}},
            {"objective": "supervised", "data": {"paths": [str(triplets)], "source_field": "source"}, "steps": 3,
             "batch_size": 4, "same_source_batches": True, "instruction": "Find a paraphrase: ",
             "optimizer": {"lr": 1e-3}, "save_merged": True},
        ],
    }
    recipe.update(extra)
    return recipe


def losses_of(run: Path) -> list[float]:
    """The logged losses of a run (metrics.csv rows that are not events)."""
    with open(run / "metrics.csv", newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle) if not row["event"]]
