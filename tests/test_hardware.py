"""The dtype and thread choices follow what this CPU runs natively and what this process may use."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml

from embedkit import hardware
from embedkit.backbone import fast_dtype, resolve_dtype

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
CPU_RECIPES = sorted(RECIPES.glob("*-cpu.yaml"))  # every recipe sized for a CPU says so in its name

AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512_bf16"}
AMX = AVX2_ONLY | {"avx512f", "amx_tile", "amx_bf16"}


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to run on a CPU with the given flags (and reset the once-per-process warning)."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(hardware, "_warned_slow_bf16", [])

    def use(flags):
        monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    return use


@pytest.mark.parametrize("flags, expected", [(AVX2_ONLY, torch.float32), (AVX512_BF16, torch.bfloat16),
                                             (AMX, torch.bfloat16), (frozenset(), torch.float32)])
def test_fast_dtype_follows_native_bf16(cpu, flags, expected):
    cpu(flags)
    assert fast_dtype("cpu") is expected
    assert resolve_dtype("auto") is expected


def test_onednn_isa_cap_below_bf16_means_float32(cpu, monkeypatch):
    cpu(AMX)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert fast_dtype("cpu") is torch.float32
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert fast_dtype("cpu") is torch.bfloat16


def test_explicit_bfloat16_without_native_support_warns_once(cpu, caplog):
    cpu(AVX2_ONLY)
    with caplog.at_level(logging.WARNING, logger="embedkit.hardware"):
        assert resolve_dtype("bfloat16") is torch.bfloat16
        assert resolve_dtype(torch.bfloat16) is torch.bfloat16
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "10-100x slower than float32. Set dtype to auto (or float32)." in warnings[0]


def test_explicit_bfloat16_on_native_cpu_is_silent(cpu, caplog):
    cpu(AMX)
    with caplog.at_level(logging.WARNING, logger="embedkit.hardware"):
        assert resolve_dtype("bfloat16") is torch.bfloat16
    assert not caplog.records


@pytest.mark.parametrize("recipe", CPU_RECIPES, ids=lambda p: p.stem)
def test_cpu_recipes_take_the_native_dtype(cpu, recipe):
    dtype = yaml.safe_load(recipe.read_text())["model"]["dtype"]
    assert dtype == "auto", f"{recipe.name}: CPU recipes must use dtype: auto (bf16 is 10-100x slower on AVX2)"
    cpu(AVX2_ONLY)
    assert resolve_dtype(dtype) is torch.float32
    cpu(AMX)
    assert resolve_dtype(dtype) is torch.bfloat16


def test_available_cpus_honours_affinity_and_cgroup_quota(monkeypatch):
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(hardware, "_cgroup_cpu_limit", lambda: None)
    assert hardware.available_cpus() == 4
    monkeypatch.setattr(hardware, "_cgroup_cpu_limit", lambda: 2.5)
    assert hardware.available_cpus() == 2
    monkeypatch.setattr(hardware, "_cgroup_cpu_limit", lambda: 0.5)
    assert hardware.available_cpus() == 1


def test_thread_policy_sets_torch_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(hardware, "available_cpus", lambda: 1)
    try:
        assert hardware.apply_thread_policy() == 1 and torch.get_num_threads() == 1
        assert hardware.apply_thread_policy(2) == 2 and torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
            hardware.apply_thread_policy(0)
    finally:
        torch.set_num_threads(before)


def test_describe_cpu_names_model_isa_and_threads():
    info = hardware.describe_cpu()
    assert info["isa"] == torch.backends.cpu.get_cpu_capability()
    assert info["torch_threads"] == torch.get_num_threads() and info["cpu"]


def test_openmp_spins_briefly_unless_the_user_chose(tmp_path):
    """A short OpenMP spin (set before torch loads) keeps 2 threads fast beside busy neighbours."""
    import os
    import subprocess
    import sys

    code = "import embedkit, os; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "10000"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "GOMP_SPINCOUNT": "42"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "42"


def test_bitsandbytes_optional_kernel_notice_is_not_printed_by_every_command():
    """peft imports bitsandbytes, whose CPU backend logged 'Failed to load CPU gemm_4bit_forward ...' (an optional
    package) as the first line of every embedkit command; other bitsandbytes messages still pass."""
    import logging
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import embedkit, peft"], capture_output=True, text=True, check=True)
    assert "gemm_4bit_forward" not in out.stderr + out.stdout
    record = logging.LogRecord("bitsandbytes.backends.cpu.ops", logging.WARNING, "ops.py", 1, "another %s", ("x",),
                               None)
    assert logging.getLogger("bitsandbytes.backends.cpu.ops").filter(record)
