"""The main job end to end (`embedkit demo`) on the tiny real model: every stage runs and reports."""

from __future__ import annotations

import pytest

from embedkit.cli.demo import DEFAULT_RECIPE, run_demo
from embedkit.embedder import Embedder
from embedkit.evaluation.sts import sts_spearman


def test_demo_end_to_end_on_stories(stories_path, data_dir, tmp_path):
    lines: list[str] = []
    overrides = [f"model.base={stories_path}", "model.dtype=float32", f"output_dir={tmp_path / 'run'}",
                 "stages.0.steps=2", "stages.0.batch_size=4", "compile=false",  # compiled steps: test_train_compile
                 "evaluate.sts_splits=[]", "logging.progress_bar=false", "checkpoint.every=0"]
    figures = run_demo(data_dir, DEFAULT_RECIPE, overrides, echo=lines.append, with_baselines=False)
    text = "\n".join(lines)
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]", "saved embedder:"):
        assert step in text
    assert figures["baselines"] == {}  # skipped here: the same scorer as "before" (tests/test_baseline_quality.py)
    assert 0 <= figures["retrieval"]["ndcg_at_10"] <= 1 and 0 <= figures["retrieval"]["recall_at_100"] <= 1
    assert figures["retrieval"]["n_documents"] == 1000 and "1000 passages, " in text
    assert list(figures["mteb"]) == ["STSBenchmark"] and figures["after"] == figures["mteb"]["STSBenchmark"]
    # "before" comes from our own STS scorer, "after" from MTEB's evaluator: they agree on the same model
    trained = Embedder.load(tmp_path / "run" / "final")
    trained.config.max_length = 128
    assert abs(sts_spearman(trained, data_dir) - figures["after"]) < 0.01
    assert not (tmp_path / "run" / "results.json").exists()  # the recipe's own per-stage scoring is off


def test_missing_data_is_found_before_any_model_loads(tmp_path, data_dir, monkeypatch):
    """Issue 15, 2.11: training data and MSMARCO were checked only after minutes of baselines / training."""
    import embedkit.backbone

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(embedkit.backbone, "load_backbone", no_model)
    partial = tmp_path / "data"
    (partial / "sts").mkdir(parents=True)
    (partial / "README.md").write_text("a data folder without retrieval tasks or training data\n")
    (partial / "sts" / "STSBenchmark").symlink_to(data_dir / "sts" / "STSBenchmark")
    with pytest.raises(ValueError) as err:
        run_demo(partial, DEFAULT_RECIPE, [f"output_dir={tmp_path / 'run'}"], echo=lambda line: None)
    message = str(err.value)
    assert message.startswith("The demo cannot run (nothing was loaded yet): Task folder ")
    assert "retrieval/MSMARCO-5k does not exist" in message
    assert "stages.0 (distill): Data file 'triplets/SNLI/train.jsonl' not found" in message
    assert "STSBenchmark" not in message  # present and sound
    with pytest.raises(ValueError, match=r"--no-train needs a trained embedder in .*run/final"):
        run_demo(data_dir, DEFAULT_RECIPE, [f"output_dir={tmp_path / 'run'}"], train=False, echo=lambda line: None)
