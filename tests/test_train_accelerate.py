"""The shipped accelerate configs parse as accelerate configs; a 2-process accelerate launch (DDP on CPU)
trains to the same weights as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train_helpers import tiny_recipe

from embedkit.train import run_recipe

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name, kind", [("fsdp.yaml", "FSDP"), ("deepspeed-zero3.yaml", "DEEPSPEED"),
                                        ("multi-cpu.yaml", "MULTI_CPU")])
def test_accelerate_configs_are_accepted(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "accelerate" / name))
    assert str(config.distributed_type).endswith(kind)
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_use_orig_params"] is True  # needed with frozen + LoRA parameters
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 3


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_match_one(tmp_path):
    recipe = tiny_recipe(tmp_path / "data", tmp_path / "one")
    recipe["lora"]["dropout"] = 0.0
    recipe["stages"] = recipe["stages"][2:3]
    recipe["stages"][0]["same_source_batches"] = False
    recipe["checkpoint"]["every"] = 0
    single = run_recipe(recipe)
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({**recipe, "output_dir": str(tmp_path / "two")}))
    launcher = Path(sys.executable).parent / "accelerate"
    proc = subprocess.run([str(launcher), "launch", "--config_file", str(REPO / "accelerate" / "multi-cpu.yaml"),
                           "-m", "embedkit", "train", str(path)], capture_output=True, text=True, timeout=900,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(single / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_gem_stage_under_accelerate_keeps_its_hook_and_runs_through_the_wrapper(tmp_path, monkeypatch):
    """Under ``accelerate launch`` the trainer used to overwrite the GEM forward hook with its own and clear it
    after the stage, so the STS evaluation after a GEM stage ran without GEM (and GEM's forwards bypassed the
    wrapper). One process, accelerate's launch environment set, the wrapper a counting module."""
    from accelerate.state import AcceleratorState
    from test_train_helpers import TINY_MODEL, write_data

    import embedkit.evaluation.sts as sts
    from accelerate import Accelerator

    texts, _ = write_data(tmp_path / "data")
    calls = {"forward": 0}

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            calls["forward"] += 1
            return self.inner(*args, **kwargs)

    hooks = []

    def spy_sts(embedder, data_dir, split):
        hooks.append(type(embedder.forward_hook).__name__)
        return 0.5

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setattr(Accelerator, "prepare_model", lambda self, model, **kw: Counting(model))
    monkeypatch.setattr(sts, "sts_spearman", spy_sts)
    recipe = {
        "model": {"base": TINY_MODEL, "dtype": "float32", "attention": "causal", "pooling": "last", "max_length": 24},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "output_dir": str(tmp_path / "run"), "seed": 7, "threads": 1,
        "checkpoint": {"every": 0}, "evaluate": {"sts_splits": ["dev"]},
        "logging": {"every": 1, "progress_bar": False, "tensorboard": False, "plot": False},
        "stages": [{"objective": "gem", "data": {"paths": [str(texts)]}, "steps": 2, "batch_size": 4,
                    "switch_step": 1, "contrastive_weight": 0.5}],
    }
    try:
        run_recipe(recipe)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert hooks == ["GEMHook"]  # the evaluation after the GEM stage embeds with GEM
    assert calls["forward"] == 3  # step 0: NTP; step 1: NTP and contrastive: all through the wrapper
