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
