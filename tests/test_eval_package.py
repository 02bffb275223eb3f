"""The evaluation package as installed: importing it changes nothing in the process, and its task sets and
instruction table ship as package data (found with importlib.resources, not from the source checkout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    return {**env, **extra}


def test_importing_the_mteb_wrapper_leaves_the_environment_alone(tmp_path):
    """Offline mode is an explicit call of the eval entry points, never a side effect of an import. (torch and
    faiss set allocator variables when imported: they are imported first, so only embedkit's effect is seen.)"""
    script = ("import json, os; import torch, faiss, mteb, datasets, transformers, sentence_transformers; "
              "before = dict(os.environ); import embedkit.evaluation.mteb_model, embedkit.evaluation.harness, "
              "embedkit.evaluation.cli; changed = sorted(k for k in set(before) | set(os.environ) "
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
