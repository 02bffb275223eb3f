"""What this CPU runs natively and how many cores this process may use: the facts behind dtype and threads.

bfloat16 is only fast on CPUs with native bf16 matmuls (AMX, AVX512-BF16); elsewhere torch falls back to a
reference GEMM that runs 10-100x slower than float32. The machine's core count can also overstate what a
process may use (CPU affinity, a container's cgroup quota), and OpenMP threads beyond that share cores.
Every speed figure is labelled with ``describe_cpu()``.
"""

from __future__ import annotations

import logging
import math
import os
import platform
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which oneDNN still has native bf16 matmuls
_BF16_ONEDNN_ISAS = ("BF16", "AMX", "FP16", "AVX10", "ALL")


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


@cache
def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC", "Intel(R) Xeon(R) ..."), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def native_bf16_cpu() -> bool:
    """Whether bfloat16 matmuls run natively here (AMX or AVX512-BF16, and oneDNN not capped below them)."""
    if not any(flag in cpu_flags() for flag in BF16_CPU_FLAGS):
        return False
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return not cap or any(name in cap for name in _BF16_ONEDNN_ISAS)


_warned_slow_bf16: list[bool] = []  # one warning per process


def warn_if_slow_bfloat16(dtype: torch.dtype, device: torch.device) -> None:
    """One warning (per process) when bfloat16 was asked for on a CPU that does not run it natively."""
    if dtype == torch.bfloat16 and device.type == "cpu" and not native_bf16_cpu() and not _warned_slow_bf16:
        _warned_slow_bf16.append(True)
        logger.warning(
            "bfloat16 on a CPU without native bf16 (%s, %s, no AMX / AVX512-BF16): matmuls fall back to a "
            "reference kernel, typically 10-100x slower than float32. Set dtype to auto (or float32).",
            cpu_model(), torch.backends.cpu.get_cpu_capability(),
        )


def _cgroup_cpu_limit() -> float | None:
    """CPUs granted by the cgroup quota (v2 ``cpu.max`` or v1 ``cfs_quota_us``), or None when unlimited."""
    v2 = Path("/sys/fs/cgroup/cpu.max")
    try:
        if v2.is_file():
            quota, _, period = v2.read_text().partition(" ")
            return None if quota == "max" else int(quota) / int(period)
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """Cores this process may run on: its CPU affinity, capped by the cgroup quota (at least 1)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        count = min(count, max(1, math.floor(limit)))
    return max(1, count)


def apply_thread_policy(threads: int | None = None) -> int:
    """Set torch's thread count: ``threads`` if given, else the cores this process may use; returns it."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}.")
    chosen = threads or available_cpus()
    torch.set_num_threads(chosen)
    logger.info("torch threads: %d (%s)", chosen, "as asked" if threads else
                f"the CPUs this process may use, of {os.cpu_count()}")
    return chosen


def describe_cpu() -> dict:
    """The CPU, its ISA level, native bf16 and threads: every benchmark and run records this."""
    return {
        "cpu": cpu_model(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16_cpu(),
        "cpus_available": available_cpus(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
