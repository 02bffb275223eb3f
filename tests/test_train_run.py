"""Whole training runs on the 260K-parameter stories model: outputs, exact resume after kill -9, refusal to
resume another recipe, a checkpoint write that fails half-way, and hooks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train_helpers import TINY_MODEL, tiny_recipe

import embedkit.train.checkpoint as checkpoint_module
from embedkit.train import run_recipe
from embedkit.train.checkpoint import ResumeError, latest_checkpoint

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted run, shared by the tests that inspect its outputs."""
    root = tmp_path_factory.mktemp("full")
    recipe = tiny_recipe(root / "data", root / "run")
    final = run_recipe(recipe)
    return recipe, root / "run", final


def test_outputs_load_in_embedkit_and_sentence_transformers(full_run):
    from sentence_transformers import SentenceTransformer

    from embedkit import Embedder

    _, run, final = full_run
    assert final == run / "final"
    texts = ["Once upon a time there was a cat.", "The dog ran home."]
    ours = Embedder.load(final).encode(texts)
    st = SentenceTransformer(str(final), device="cpu").encode(texts)
    assert np.allclose(ours, st, atol=1e-4)
    assert json.loads((final / "embedkit.json").read_text())["attention"] == "bidirectional"
    assert json.loads((final / "config.json").read_text())["is_causal"] is False
    for name in ("0-mntp", "1-simcse", "2-supervised"):
        adapter = run / "stages" / name / "adapter"
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == TINY_MODEL
        assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((run / "stages" / "2-supervised" / "adapter" / "stack.json").read_text())["merge_first"] == [
        "../../0-mntp/adapter", "../../1-simcse/adapter"]
    assert (run / "stages" / "2-supervised" / "embedder" / "embedkit.json").is_file()  # save_merged
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 + 4 + 3  # header + one row per step
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert list((run / "tb").glob("events.out.tfevents.*"))


def test_mntp_keeps_the_lm_head_and_embeddings_frozen(full_run):
    _, _, final = full_run
    original = load_file(f"{TINY_MODEL}/model.safetensors")
    key = next(k for k in original if k.endswith("embed_tokens.weight"))
    trained = load_file(str(final / "model.safetensors"))
    emb = trained[next(k for k in trained if k.endswith("embed_tokens.weight"))]
    assert emb.shape[0] == original[key].shape[0] + 1  # the new mask token
    assert torch.equal(emb[: original[key].shape[0]], original[key])
    layer = next(k for k in original if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert not torch.equal(trained[next(k for k in trained if k.endswith("layers.0.self_attn.q_proj.weight"))],
                           original[layer])  # while the merged LoRA changed the projections


def test_kill_9_then_resume_matches_uninterrupted(full_run, tmp_path):
    recipe, _, final = full_run
    recipe = {**recipe, "output_dir": str(tmp_path / "run")}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    code = (f"import sys, json; sys.path.insert(0, {str(TESTS)!r}); import test_train_helpers; "
            f"from embedkit.train import run_recipe; run_recipe(json.loads(open({str(path)!r}).read()))")
    env = {**os.environ, "EMBEDKIT_TEST_KILL_AT": "2"}  # killed at the start of SimCSE step 2
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert json.loads((ckpt / "state.json").read_text())["stage"] == 1
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2
    assert not (tmp_path / "run" / "final").exists()
    with pytest.raises(ResumeError, match="already holds a run. Pass --resume"):
        run_recipe(recipe)
    resumed = run_recipe(recipe, resume="auto")
    a = load_file(str(final / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 + 4 + 3  # rows past the checkpoint were dropped, then re-logged


def test_resume_refuses_a_different_recipe(full_run, tmp_path):
    recipe, run, _ = full_run
    other = json.loads(json.dumps(recipe))
    other["stages"][1]["optimizer"]["lr"] = 5e-4
    with pytest.raises(ResumeError, match=r"different recipe .*differing fields: stages.1.optimizer.lr"):
        run_recipe(other, resume=True)
    with pytest.raises(ResumeError, match="Nothing to resume"):
        run_recipe({**recipe, "output_dir": str(tmp_path / "empty")}, resume=True)
    assert run_recipe(recipe, resume="auto") == run / "final"  # finished: returns at once
    assert run_recipe(recipe, resume=True) == run / "final"


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    recipe = tiny_recipe(tmp_path / "data", tmp_path / "run")
    recipe["stages"] = recipe["stages"][1:2]
    recipe["stages"][0].pop("attention_schedule")
    calls = {"n": 0}
    real = checkpoint_module.save_file

    def flaky(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # second checkpoint's first file: the disk is full
            Path(filename).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", flaky)
    with pytest.raises(OSError, match="No space left"):
        run_recipe(recipe)
    root = tmp_path / "run" / "checkpoints"
    ckpt = latest_checkpoint(root)
    assert ckpt.name == "stage00-step00000001"
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "stage00-step00000001"]  # no half folder
    monkeypatch.setattr(checkpoint_module, "save_file", real)
    assert (run_recipe(recipe, resume=True) / "embedkit.json").is_file()


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    """Global batch semantics: 2 gloo processes with half the batch each == 1 process (no dropout)."""
    recipe = tiny_recipe(tmp_path / "data", tmp_path / "one")
    recipe["lora"]["dropout"] = 0.0
    recipe["stages"] = recipe["stages"][1:3]
    recipe["stages"][0].pop("attention_schedule")
    recipe["stages"][0]["attention_dropout"] = 0.0
    recipe["stages"][1]["same_source_batches"] = False
    recipe["checkpoint"]["every"] = 0
    single = run_recipe(recipe)
    two = {**recipe, "output_dir": str(tmp_path / "two")}
    path = tmp_path / "two.json"
    import yaml

    path.write_text(yaml.safe_dump(two))
    with socket.socket() as sock:  # torchrun's --master_port 0 hangs with the static rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), "-m", "embedkit", "train", str(path)],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(single / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    one_rows = (tmp_path / "one" / "metrics.csv").read_text().splitlines()
    two_rows = (tmp_path / "two" / "metrics.csv").read_text().splitlines()
    one_loss = [float(r.split(",")[3]) for r in one_rows[1:]]
    two_loss = [float(r.split(",")[3]) for r in two_rows[1:]]
    assert np.allclose(one_loss, two_loss, atol=1e-4)
