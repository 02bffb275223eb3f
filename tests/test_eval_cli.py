"""`embedkit eval` and `embedkit eval compare`: a real tiny model end to end, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
from test_eval_helpers import STORIES, make_pair, make_sts, write_task
from typer.testing import CliRunner

from embedkit.cli import app

runner = CliRunner()


def _eval(*args: str):
    return runner.invoke(app, ["eval", *args])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """stories260K evaluated twice (mean and last pooling) on a tiny STS + pair-classification folder, given as
    a folder of task folders and as a task-set file."""
    root = tmp_path_factory.mktemp("cli")
    make_sts(root / "data", n=20)
    make_pair(root / "data")
    (root / "set.txt").write_text("# both tiny tasks, relative to --data\npair_classification/TinyPairs\nsts/TinySTS\n")
    results = []
    for pooling, tasks in (("mean", ["--task-dir", str(root / "data")]),
                           ("last", ["--task-set", str(root / "set.txt"), "--data", str(root / "data")])):
        out = root / "results" / pooling
        result = _eval(str(STORIES), *tasks, "--pooling", pooling, "--dtype", "float32", "--output", str(out))
        assert result.exit_code == 0, result.output
        results.append((result, out))
    return root, results


def test_eval_runs_a_folder_of_tasks(two_runs):
    _, [(result, out), _] = two_runs
    assert "2 task(s): TinyPairs, TinySTS" in result.output
    assert "model stories260K-causal-mean (embedkit, fingerprint" in result.output
    run = json.loads((out / "run.json").read_text())
    assert [t["name"] for t in run["tasks"]] == ["TinyPairs", "TinySTS"]
    assert run["model"]["config"]["pooling"] == "mean" and run["model"]["spec"] == str(STORIES)
    for name in ("summary.md", "summary.csv", "scores.png", "mteb/TinySTS.json", "mteb/TinyPairs.json"):
        assert (out / name).is_file()
    assert f"{100 * run['average']:.2f}" in result.output


def test_compare_prints_one_table(two_runs, tmp_path):
    root, [(_, mean_out), (_, last_out)] = two_runs
    page = tmp_path / "RESULTS.md"
    (tmp_path / "intro.md").write_text("What these numbers are.\n")
    result = runner.invoke(app, ["eval", "compare", str(root / "results"), "--markdown", str(page),
                                 "--preamble", str(tmp_path / "intro.md"),
                                 "--csv", str(tmp_path / "c.csv"), "--plot", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "| model | TinyPairs | TinySTS | **avg** |"
    runs = [json.loads((d / "run.json").read_text()) for d in (last_out, mean_out)]  # folder order: last, mean
    for line, run in zip(lines[2:4], runs, strict=True):
        assert line.startswith(f"| {run['model']['label']} |")
        assert f"**{100 * run['average']:.2f}**" in line
    assert "Run time per task" in result.output
    text = page.read_text()
    assert text.startswith("# Evaluation results\n\nWhat these numbers are.\n\n| model | TinyPairs |")
    assert run["model"]["fingerprint"] in text and "## Runs and data" in text
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "c.csv").read_text().splitlines()[0] == "model,fingerprint,TinyPairs,TinySTS,average," \
                                                               "total_seconds"


def test_compare_flags_different_data(two_runs, tmp_path):
    root, [(_, mean_out), _] = two_runs
    other = tmp_path / "other"
    run = json.loads((mean_out / "run.json").read_text())
    run["tasks"][1]["checksum"] = "0" * 64
    run["tasks"] = run["tasks"][1:]
    run["model"]["label"] = "other"
    other.mkdir()
    (other / "run.json").write_text(json.dumps(run))
    result = runner.invoke(app, ["eval", "compare", str(mean_out), str(other)])
    assert result.exit_code == 0, result.output
    assert "Note: TinySTS: runs used different data" in result.output
    assert "Note: average over the 1 task(s) every run has: TinySTS." in result.output
    assert "| other | – |" in result.output


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    (line,) = [x for x in result.output.splitlines() if x.strip()][-1:]
    assert line.startswith("error: ")
    for fragment in fragments:
        assert fragment in line
    return line


def test_nothing_to_evaluate():
    _one_line_error(_eval(str(STORIES)), "Nothing to evaluate: give --task-dir DIR, --task-set NAME or --tasks")


def test_bad_task_json_is_one_line(tmp_path):
    folder = write_task(tmp_path / "Bad", {"name": "Bad", "type": "sts", "max_score": 5})
    _one_line_error(_eval(str(STORIES), "--task-dir", str(folder)),
                    "Bad/task.json: field 'min_score' is missing or not a number")
    folder = write_task(tmp_path / "Odd", {"name": "Odd", "type": "ranking"})
    _one_line_error(_eval(str(STORIES), "--task-dir", str(folder)), "unknown task type; valid: sts, retrieval")


def test_unsafe_task_name_is_one_line(tmp_path):
    folder = make_sts(tmp_path)
    (folder / "task.json").write_text(json.dumps({"name": "../../x", "type": "sts", "min_score": 0, "max_score": 5}))
    _one_line_error(_eval(str(STORIES), "--task-dir", str(folder), "--output", str(tmp_path / "out")),
                    "task.json: field 'name': task name '../../x' is not a safe file name")
    assert not (tmp_path / "out").exists()


def test_bad_rows_fail_before_the_model_loads(tmp_path):
    """docs/evaluation.md: rows are checked before any model loads (the model here does not even exist)."""
    folder = make_sts(tmp_path)
    with (folder / "test.jsonl").open("a") as handle:
        handle.write(json.dumps({"sentence1": "x", "sentence2": "y", "score": "high"}) + "\n")
    line = _one_line_error(_eval(str(tmp_path / "no-such-model"), "--task-dir", str(folder)),
                           "TinySTS/test.jsonl:13: field 'score' is 'high', not a number")
    assert "could not load model" not in line


def test_model_that_does_not_load_is_one_line(tmp_path):
    make_sts(tmp_path)
    _one_line_error(_eval(str(tmp_path / "no-such-model"), "--task-dir", str(tmp_path)),
                    "could not load model", "no-such-model")


def test_debug_shows_the_traceback(tmp_path):
    make_sts(tmp_path)
    result = _eval(str(tmp_path / "no-such-model"), "--task-dir", str(tmp_path), "--debug")
    assert result.exit_code != 0 and result.exception is not None


def test_unknown_mteb_task_lists_near_matches(tmp_path):
    _one_line_error(_eval(str(STORIES), "--tasks", "STSBenchmrk"),
                    "No mteb task named 'STSBenchmrk'. Near matches: STSBenchmark")


def test_standard_task_without_its_data_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_line_error(_eval(str(STORIES), "--tasks", "STSBenchmark"),
                    "mteb task 'STSBenchmark' needs mteb/stsbenchmark-sts", "the hub is off (HF_HUB_OFFLINE=1)",
                    "--task-dir (task 'STSBenchmark')")


def test_compare_of_a_folder_without_results(tmp_path):
    _one_line_error(runner.invoke(app, ["eval", "compare", str(tmp_path)]), "is not an evaluation results folder")


def test_saved_embedder_runs_as_saved(tmp_path):
    from embedkit import Embedder

    saved = Embedder.from_pretrained(STORIES, pooling="mean", dtype="float32").save(tmp_path / "my-embedder")
    make_sts(tmp_path / "data")
    _one_line_error(_eval(str(saved), "--task-dir", str(tmp_path / "data"), "--pooling", "last"),
                    "saved embedder with pooling='mean'; pooling='last' does not apply")
    result = _eval(str(saved), "--task-dir", str(tmp_path / "data"), "--output", str(tmp_path / "out"),
                   "--max-length", "64")
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["model"]["label"] == "my-embedder" and run["model"]["spec"] == str(saved)
    assert run["model"]["config"]["pooling"] == "mean" and run["model"]["config"]["max_length"] == 64


def test_compile_refuses_sentence_transformers_models(tmp_path):
    make_sts(tmp_path)
    _one_line_error(_eval("all-MiniLM-L6-v2", "--task-dir", str(tmp_path), "--compile"),
                    "--compile applies to embedkit models")


def test_compile_flag_compiles_and_is_recorded(tmp_path, monkeypatch):
    from embedkit import Embedder  # noqa: PLC0415

    make_sts(tmp_path / "data", n=20)
    calls = []
    monkeypatch.setattr(Embedder, "compile_layers", lambda self: calls.append(self) or self)  # compiling: test_embedder
    result = _eval(str(STORIES), "--task-dir", str(tmp_path / "data"), "--dtype", "float32", "--compile",
                   "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert len(calls) == 1
    assert json.loads((tmp_path / "out" / "run.json").read_text())["model"]["runtime"]["compiled"] is True
