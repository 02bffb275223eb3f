"""The evaluation package as installed: importing it changes nothing in the process, and its task sets and
instruction table ship as package data (found with importlib.resources, not from the source checkout)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    return {**env, **extra}


def test_importing_the_mteb_wrapper_leaves_the_environment_alone(tmp_path):
    """Offline mode is an explicit call of the eval entry points, never a side effect of an import. (torch and
    faiss set allocator variables when imported: they are imported first, so only embedkit's effect is seen.)"""
    script = ("import json, os; import torch, faiss, mteb, datasets, transformers, sentence_transformers; "
              "before = dict(os.environ); import embedkit.evaluation.mteb_model, embedkit.evaluation.harness, "
              "embedkit.cli.eval; changed = sorted(k for k in set(before) | set(os.environ) "
              "if before.get(k) != os.environ.get(k)); print(json.dumps(changed))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=_child_env(PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_ensure_offline_sets_the_switches_when_called(monkeypatch):
    from embedkit.evaluation.offline import OFFLINE_VARS, ensure_offline

    for name in OFFLINE_VARS:
        monkeypatch.delenv(name, raising=False)
    assert ensure_offline() is True
    assert all(os.environ[name] == "1" for name in OFFLINE_VARS)


def test_task_sets_and_instructions_are_package_data():
    from importlib import resources

    from embedkit.evaluation.mteb_model import InstructionTable, load_instructions
    from embedkit.evaluation.task_sets import read_task_set, task_set_names

    root = resources.files("embedkit.evaluation")
    assert (root / "tasksets" / "quick.txt").is_file() and (root / "instructions.json").is_file()
    assert task_set_names() == ["full", "quick"]
    assert read_task_set("quick", Path("/data")) == [Path("/data/sts/STSBenchmark"),
                                                      Path("/data/retrieval/MSMARCO-5k"),
                                                      Path("/data/pair_classification/MRPC")]
    shipped = load_instructions("default")
    assert shipped.digest() == InstructionTable.from_json((root / "instructions.json").read_text(), "x").digest()
    assert shipped.tasks and load_instructions("none") is None
    with pytest.raises(FileNotFoundError, match="known sets: full, quick"):
        read_task_set("nope", Path("/data"))


def test_a_non_editable_install_lists_the_quick_task_set(tmp_path):
    """pip install (not editable) into a folder, then read the task set from another cwd: no source tree.
    (The install runs on a copy of the sources: setuptools writes build/ and *.egg-info beside them.)"""
    source, target = tmp_path / "src", tmp_path / "site"
    shutil.copytree(REPO / "embedkit", source / "embedkit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(source)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (target / "eval").exists()
    script = ("import embedkit.evaluation.task_sets as t, embedkit.evaluation.mteb_model as m; "
              f"assert t.__file__.startswith({str(target)!r}), t.__file__; "
              "print([p.as_posix() for p in t.read_task_set('quick', __import__('pathlib').Path('D'))]); "
              "print(len(m.load_instructions('default').tasks) > 0)")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=elsewhere, env=_child_env(PYTHONPATH=str(target)))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines() == ["['D/sts/STSBenchmark', 'D/retrieval/MSMARCO-5k', "
                                       "'D/pair_classification/MRPC']", "True"]
