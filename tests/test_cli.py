"""The embedkit command: info, embed, and one-line errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from embedkit.cli import app

runner = CliRunner()


def test_info(stories_path):
    result = runner.invoke(app, ["info", str(stories_path), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "LlamaModel" in result.output
    assert "parameters" in result.output and "260,032" in result.output
    assert "layers" in result.output and "hidden_size" in result.output
    assert "float32" in result.output and "causal" in result.output


def test_embed_json(stories_path):
    result = runner.invoke(app, ["embed", str(stories_path), "Once upon a time", "A dog", "--json",
                                 "--dtype", "float32", "--attention", "bidirectional"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["dimension"] == 64 and len(payload["embeddings"]) == 2


def test_errors_are_one_line(tmp_path, stories_path):
    result = runner.invoke(app, ["info", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "error: Model spec" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["embed", str(stories_path), "hi", "--pooling", "max"])
    assert result.exit_code == 2 and "Unknown pooling 'max'" in result.output


def test_demo_without_data_says_what_to_do(tmp_path, monkeypatch):
    result = runner.invoke(app, ["demo", "--data", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "No data folder found" in result.output and "--data DIR" in result.output


def test_help_lists_the_commands_that_exist():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "later issues" not in result.output
    for command in ("info", "embed", "train", "encode", "index", "search", "eval", "demo"):
        assert command in result.output


def test_max_length_zero_is_refused(stories_path):
    for command in (["info", str(stories_path)], ["embed", str(stories_path), "hi"]):
        result = runner.invoke(app, [*command, "--max-length", "0", "--dtype", "float32"])
        assert result.exit_code == 2, result.output
        assert result.output.strip() == "error: max_length must be at least 2, got 0."


def test_embed_dimensions(stories_path):
    result = runner.invoke(app, ["embed", str(stories_path), "A dog", "--json", "--dtype", "float32",
                                 "--dimensions", "8"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["dimension"] == 8 and len(payload["embeddings"][0]) == 8
